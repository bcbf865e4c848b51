#!/usr/bin/env python
"""Memory across updates: a model opened, then N updates through the product switch (each
new model compiled, switched in, the old one released after 30 decided frames).

    python benchmarks/update_memory.py demo-out/bundle --updates 10

Prints the resident memory with one model, with two, and after the updates.
"""

from __future__ import annotations

import argparse
import gc
import os

from lineside.runtime.model import open_checked
from lineside.runtime.products import Product, ProductSwitch


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--updates", type=int, default=10)
    args = parser.parse_args()
    model = open_checked(args.bundle)
    model.engine("latency")
    gc.collect()
    print(f"one model: {rss_mb():.0f} MB")
    switch = ProductSwitch([Product(0, "line", model, None, None)])
    for k in range(args.updates):
        new = Product(0, "line", open_checked(args.bundle), None, None)
        new.engine = new.model.engine("latency")
        if k == 0:
            print(f"two models: {rss_mb():.0f} MB")
        switch.replace(new)
        product, _ = switch.take()
        switch.switched(product)
        for _ in range(30):
            switch.decided()
        switch.release_retired(30)
        gc.collect()
    print(f"after {args.updates} updates, each old model released: {rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
