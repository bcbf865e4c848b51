#!/usr/bin/env python
"""Memory across updates: a model opened, then N updates, each new model compiled and
switched in, the old one released after it (RELEASE_AFTER frames decided by the new one).

    python benchmarks/update_memory.py demo-out/bundle --updates 10
    python benchmarks/update_memory.py demo-out/bundle --updates 10 --station

Without --station, through the product switch alone. With --station, a whole
`lineside run --updates DIR --pace 30` (log, page-less) runs in this process on a folder of
frames, and the bundle is copied into DIR N times (hard links, a bundle.json of its own
each), each as soon as the one before has taken over. Prints the resident memory with one
model, with two, the largest while updating, and after the updates, and whether the first
model is still held by anything once it was released.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import shutil
import sqlite3
import tempfile
import threading
import time
import weakref
from pathlib import Path
from types import SimpleNamespace

from lineside.runtime.model import open_checked
from lineside.runtime.products import Product, ProductSwitch


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def through_the_switch(bundle: str, updates: int) -> None:
    first = Product(0, "line", open_checked(bundle), None, None)
    first.engine = first.model.engine("latency")
    gc.collect()
    print(f"one model: {rss_mb():.0f} MB")
    switch = ProductSwitch([first])
    held = weakref.ref(first.model)
    del first     # only the switch holds it now: the first update releases it
    for k in range(updates):
        new = Product(0, "line", open_checked(bundle), None, None)
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
    print(f"after {updates} updates, each old model released: {rss_mb():.0f} MB; "
          f"first model still held: {held() is not None}")


def _events(log: Path, kind: str) -> int:
    try:
        with sqlite3.connect(f"file:{log}?mode=ro", uri=True) as con:
            return con.execute("SELECT count(*) FROM events WHERE kind = ?", (kind,)).fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _wait(log: Path, kind: str, count: int, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while _events(log, kind) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"no {count}th {kind} event in {seconds} s")
        time.sleep(0.05)


def endless(images, done: threading.Event):
    """A source (runtime/sources.py's interface) of the same few images, until `done` is set."""
    count = itertools.count(1)

    def read():
        if done.is_set():
            return None, ""
        i = next(count)
        return images[i % len(images)], f"f{i}"

    return SimpleNamespace(fps=None, read=read, release=lambda: None)


def in_a_station(bundle: str, updates: int) -> None:
    import numpy as np

    from lineside.runtime import updates as watcher
    from lineside.runtime.app import RunOptions, run_app

    watcher.UPDATE_SETTLE_SECONDS = 0.0
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (128, 128, 3), dtype=np.uint8) for _ in range(8)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        watched, log = tmp / "updates", tmp / "log.sqlite"
        watched.mkdir()
        model = open_checked(bundle)
        held = weakref.ref(model)
        options = RunOptions(source=str(tmp), log=str(log), pace=30, seconds=3600, updates=str(watched),
                             ok_classes=model.labels[0], status=False)
        done = threading.Event()
        handed = [model]          # taken out by the station's thread: nothing here holds the first model
        del model
        station = threading.Thread(target=lambda: run_app(handed.pop(), options, load_bundle=open_checked,
                                                          opener=lambda info: endless(images, done)))
        station.start()
        try:
            time.sleep(3.0)
            gc.collect()
            print(f"one model, station running: {rss_mb():.0f} MB")
            peak = 0.0
            for k in range(updates):
                copy = tmp / f".u{k:02d}"
                shutil.copytree(bundle, copy, copy_function=os.link)
                doc = json.loads((copy / "bundle.json").read_text())
                doc["note"] = k
                (copy / "bundle.json").unlink()
                (copy / "bundle.json").write_text(json.dumps(doc))
                copy.rename(watched / f"u{k:02d}")
                _wait(log, "product_switch", k + 1)
                peak = max(peak, rss_mb())
                if k == 0:
                    print(f"two models: {rss_mb():.0f} MB")
            print(f"largest while updating (each update dropped in as soon as the one before took over, "
                  f"before it decided {watcher.RELEASE_AFTER} frames): {peak:.0f} MB")
            time.sleep(3.0)          # RELEASE_AFTER frames at 30 FPS, and the watcher's next scan
            gc.collect()
            print(f"after {updates} updates, each old model released: {rss_mb():.0f} MB; "
                  f"first model still held: {held() is not None}")
        finally:
            done.set()
            station.join(60)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--station", action="store_true", help="a whole `lineside run --updates DIR` in this process")
    args = parser.parse_args()
    (in_a_station if args.station else through_the_switch)(args.bundle, args.updates)


if __name__ == "__main__":
    main()
