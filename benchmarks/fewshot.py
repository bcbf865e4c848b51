#!/usr/bin/env python
"""Few-shot benchmark: how well do `lineside train` defaults do with k images per class?

For each k and repeat, draws k training images per class (seeded), trains exactly
as `lineside train` would (through a CSV manifest of the drawn images), evaluates
on every image not drawn, and prints balanced accuracy (mean ± std) and training
time per k.

    python benchmarks/fewshot.py ../shared/datasets/neu-det --shots 5,10,20 --repeats 3
    python benchmarks/fewshot.py elpv --shots 10,20 --repeats 3        # pip install elpv-dataset
    python benchmarks/fewshot.py elpv --shots 10 --majority functional=4   # imbalanced: 40 OK, 10 defective

Besides balanced accuracy, each row has the expected calibration error (ECE) of the
model's confidence on the held-out images and, with the run's default --reject-below,
the share of them it would call unknown and the accuracy of the rest.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import open_benchmark_data  # noqa: E402

from lineside.dataset import draw_per_class  # noqa: E402
from lineside.train.config import TrainConfig  # noqa: E402
from lineside.train.evaluate import evaluate_run  # noqa: E402
from lineside.train.run import train_run  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="a dataset folder or manifest, or 'elpv'")
    ap.add_argument("--shots", default="5,10,20")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seeds", help="the draws to run, e.g. 1,2 (default: 0 to --repeats - 1)")
    ap.add_argument("--config", type=Path, help="YAML of training options (default: lineside's defaults)")
    ap.add_argument("--json", type=Path, help="also write all results to this file")
    ap.add_argument("--majority", metavar="CLASS=FACTOR",
                    help="an imbalanced draw: FACTOR times k images of CLASS (e.g. functional=4: the OK "
                         "class is most of what a line photographs)")
    args = ap.parse_args(argv)

    images = open_benchmark_data(args.data)
    factors = None
    if args.majority:
        name, _, factor = args.majority.partition("=")
        if name not in images.classes or not factor.isdigit() or int(factor) < 1:
            raise SystemExit(f"--majority {args.majority}: expected CLASS=FACTOR with CLASS one of "
                             f"{', '.join(images.classes)} and a whole FACTOR of at least 1")
        factors = {images.classes.index(name): int(factor)}
    cfg = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
    shots = [int(s) for s in args.shots.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for k in shots:
            for seed in ([int(s) for s in args.seeds.split(",")] if args.seeds else range(args.repeats)):
                drawn, rest = draw_per_class(images.targets, k, seed, factors)
                train_csv = images.write_manifest(tmp / f"train_{k}_{seed}.csv", drawn)
                test_csv = images.write_manifest(tmp / f"test_{k}_{seed}.csv", rest)
                run = tmp / f"run_{k}_{seed}"
                t0 = time.perf_counter()
                metrics = train_run(train_csv, run, cfg.override(seed=seed), progress=False)
                train_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                report = evaluate_run(run, test_csv, progress=False)
                eval_s = time.perf_counter() - t0
                conf = report["confidence"]
                row = {"shots": k, "seed": seed, "strategy": metrics["strategy"], "train_s": round(train_s, 1),
                       "balanced_accuracy": report["balanced_accuracy"], "n_eval": report["n"],
                       "eval_s": round(eval_s, 1), "ece": conf["expected_calibration_error"],
                       "ece_out_of_fold": (metrics.get("calibration") or {}).get("ece_after"),
                       "reject_below": conf.get("reject_below"), "unknown_share": conf.get("unknown_share"),
                       "accuracy_of_the_rest": conf.get("accuracy_of_the_rest")}
                results.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)

    print(f"\n{'images/class':>12} | {'strategy':>17} | {'balanced accuracy':>19} | {'train time (s)':>14} | "
          f"{'ECE':>5} | unknown (accuracy of the rest)")
    print(f"{'-' * 12}-|-{'-' * 17}-|-{'-' * 19}-|-{'-' * 14}-|-------|-------------")
    for k in shots:
        rows = [r for r in results if r["shots"] == k]
        acc = np.array([r["balanced_accuracy"] for r in rows]) * 100
        t = np.array([r["train_s"] for r in rows])
        ece = np.mean([r["ece"] for r in rows])
        strategies = ",".join(sorted({r["strategy"] for r in rows}))
        unknown = [r for r in rows if r["unknown_share"] is not None]
        rest = (f"{100 * np.mean([r['unknown_share'] for r in unknown]):.1f}% "
                f"({100 * np.mean([r['accuracy_of_the_rest'] for r in unknown]):.2f}%)" if unknown else "-")
        print(f"{k:>12} | {strategies:>17} | {acc.mean():>8.2f}% ± {acc.std():<5.2f}   | "
              f"{t.mean():>7.0f} ± {t.std():<4.0f} | {ece:.3f} | {rest}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
