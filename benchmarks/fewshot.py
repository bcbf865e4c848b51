#!/usr/bin/env python
"""Few-shot benchmark: how well do `lineside train` defaults do with k images per class?

For each k and repeat, draws k training images per class (seeded), trains exactly
as `lineside train` would (through a CSV manifest of the drawn images), evaluates
on every image not drawn, and prints balanced accuracy (mean ± std) and training
time per k.

    python benchmarks/fewshot.py ../shared/datasets/neu-det --shots 5,10,20 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lineside.dataset import draw_per_class, load_image_set
from lineside.train.config import TrainConfig
from lineside.train.evaluate import evaluate_run
from lineside.train.run import train_run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("--shots", default="5,10,20")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--config", type=Path, help="YAML of training options (default: lineside's defaults)")
    ap.add_argument("--json", type=Path, help="also write all results to this file")
    args = ap.parse_args(argv)

    images = load_image_set(args.data)
    cfg = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
    shots = [int(s) for s in args.shots.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for k in shots:
            for seed in range(args.repeats):
                drawn, rest = draw_per_class(images.targets, k, seed)
                train_csv = images.write_manifest(tmp / f"train_{k}_{seed}.csv", drawn)
                test_csv = images.write_manifest(tmp / f"test_{k}_{seed}.csv", rest)
                run = tmp / f"run_{k}_{seed}"
                t0 = time.perf_counter()
                metrics = train_run(train_csv, run, cfg.override(seed=seed), progress=False)
                train_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                report = evaluate_run(run, test_csv, progress=False)
                eval_s = time.perf_counter() - t0
                row = {"shots": k, "seed": seed, "strategy": metrics["strategy"], "train_s": round(train_s, 1),
                       "balanced_accuracy": report["balanced_accuracy"], "n_eval": report["n"],
                       "eval_s": round(eval_s, 1)}
                results.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)

    print(f"\n{'images/class':>12} | {'strategy':>8} | {'balanced accuracy':>19} | {'train time (s)':>14}")
    print(f"{'-' * 12}-|-{'-' * 8}-|-{'-' * 19}-|-{'-' * 14}")
    for k in shots:
        rows = [r for r in results if r["shots"] == k]
        acc = np.array([r["balanced_accuracy"] for r in rows]) * 100
        t = np.array([r["train_s"] for r in rows])
        print(f"{k:>12} | {rows[0]['strategy']:>8} | {acc.mean():>8.2f}% ± {acc.std():<5.2f}   | "
              f"{t.mean():>7.0f} ± {t.std():<4.0f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
