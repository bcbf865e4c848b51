#!/usr/bin/env python
"""INT8 gate benchmark: does `lineside export` keep an INT8 model only when it holds up on
images it never saw?

For each k and draw: k training images per class are drawn (seeded), `lineside train`
runs with its defaults, `lineside export RUN --out B` runs as a user without other
labelled images would (no --eval), and then FP32 and every INT8 model the export kept
are scored, for each runtime, on every image not drawn. A kept INT8 model whose
held-out drop exceeds --max-drop points, or whose top-1 agreement with FP32 is below
--min-agreement percent, is a failure of the gate.

    python benchmarks/int8_gate.py ../shared/datasets/neu-det --shots 10 --repeats 3
    python benchmarks/int8_gate.py elpv --shots 10,20 --repeats 3     # pip install elpv-dataset
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

from lineside.dataset import draw_per_class, load_arrays  # noqa: E402
from lineside.metrics import classification_report  # noqa: E402
from lineside.runtime.model import open_model  # noqa: E402

RUNTIMES = ("openvino", "onnxruntime")


def score_bundle(bundle: Path, images, report: dict, limits: tuple[float, float]) -> dict:
    """FP32 and kept INT8 of each runtime on the held-out images; the gate's verdict beside."""
    fp32_any = open_model(bundle, backend="onnxruntime")
    x, kept, _ = load_arrays(images, fp32_any.spec, progress=False)
    y = np.asarray(kept.targets)
    labels = list(fp32_any.labels)
    out = {}
    for runtime in RUNTIMES:
        q = report["int8"].get(runtime, {})
        row = {"verdict": q.get("verdict"), "judged_on": q.get("eval_images"), "recipe": q.get("recipe")}
        if q.get("gate"):
            row.update(gate_drop=round(q["gate"]["drop_points"], 3), gate_agreement=q["gate"]["top1_agreement"])
            if "originals" in q["gate"]:
                row.update(originals_drop=round(q["gate"]["originals"]["drop_points"], 3),
                           originals_agreement=q["gate"]["originals"]["top1_agreement"])
        p32 = open_model(bundle, backend=runtime).predict_proba(x)
        bal32 = classification_report(y, p32.argmax(1), labels)["balanced_accuracy"]
        row["fp32"] = round(100 * bal32, 3)
        if q.get("verdict") in ("kept", "forced"):
            p8 = open_model(bundle, backend=runtime, precision="int8").predict_proba(x)
            bal8 = classification_report(y, p8.argmax(1), labels)["balanced_accuracy"]
            row.update(int8=round(100 * bal8, 3), drop=round(100 * (bal32 - bal8), 3),
                       agreement=round(100 * float(np.mean(p8.argmax(1) == p32.argmax(1))), 3))
            row["ok"] = bool(q["verdict"] == "forced" or (row["drop"] <= limits[0] and row["agreement"] >= limits[1]))
        else:
            row["ok"] = True   # refused (or skipped): nothing unsafe went to the line
        out[runtime] = row
    return out


def replay_verdicts(report: dict, max_drop: float, min_agreement: float) -> None:
    """With --force every INT8 model was written: the verdict the gate would have given at
    these limits, from its own figures (one recipe per runtime), goes beside it."""
    for q in report.get("int8", {}).values():
        gate = q.get("gate")
        if q.get("verdict") != "kept" or not gate:
            continue
        views = gate.get("judged_views", {"passed": True})
        limit = min_agreement
        if "agreement_limit" in (gate.get("refit") or {}):       # judged out of fold (lineside/export/bundle.py)
            from lineside.export.bundle import OUT_OF_FOLD_DISAGREEMENT
            limit = 100.0 - OUT_OF_FOLD_DISAGREEMENT * (100.0 - min_agreement)
        passed = (gate["drop_points"] <= max_drop and 100 * gate["top1_agreement"] >= limit
                  and (views["passed"] if "judged_views" not in gate else
                       views["drop_points"] <= max_drop and 100 * views["top1_agreement"] >= min_agreement))
        q["verdict"] = "kept" if passed else "forced"
        q["forced"] = True


def main(argv=None) -> int:
    from lineside.export.bundle import export_bundle
    from lineside.train.config import TrainConfig
    from lineside.train.run import train_run

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="a dataset folder or manifest, or 'elpv'")
    ap.add_argument("--shots", default="10")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--max-drop", type=float, default=0.3, help="held-out drop (points) that counts as a failure")
    ap.add_argument("--min-agreement", type=float, default=99.5, help="held-out agreement (%%) below which a "
                    "kept INT8 model counts as a failure")
    ap.add_argument("--force", action="store_true", help="export with the gate's limits off, so that every INT8 "
                    "model is written and scored on the images not drawn; the verdict is replayed from the gate's "
                    "figures with --max-drop and --min-agreement")
    ap.add_argument("--json", type=Path, help="also write all results to this file")
    ap.add_argument("--keep", type=Path, help="keep the manifests, runs and bundles in this folder")
    args = ap.parse_args(argv)

    images = open_benchmark_data(args.data)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.keep or Path(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        for k in [int(s) for s in args.shots.split(",")]:
            for seed in range(args.first_seed, args.first_seed + args.repeats):
                drawn, rest = draw_per_class(images.targets, k, seed)
                train_csv = images.write_manifest(tmp / f"train_{k}_{seed}.csv", drawn)
                images.write_manifest(tmp / f"rest_{k}_{seed}.csv", rest)
                run, bundle = tmp / f"run_{k}_{seed}", tmp / f"bundle_{k}_{seed}"
                metrics = train_run(train_csv, run, TrainConfig().override(seed=seed), progress=False)
                t0 = time.perf_counter()
                result = export_bundle(run, bundle, speed_seconds=0,
                                       **({"max_drop": 1e9, "min_agreement": 0.0} if args.force else {}))
                if args.force:
                    replay_verdicts(result["report"], args.max_drop, args.min_agreement)
                export_s = time.perf_counter() - t0
                row = {"data": str(args.data), "shots": k, "seed": seed, "strategy": metrics["strategy"],
                       "export_s": round(export_s, 1),
                       **score_bundle(bundle, images.subset(rest), result["report"],
                                      (args.max_drop, args.min_agreement))}
                results.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)

    print(f"\n{'k':>3} {'seed':>4} | {'runtime':>11} | {'verdict':>8} | {'judged drop':>11} | {'FP32':>7} | "
          f"{'INT8':>7} | {'drop':>6} | {'agreement':>9} | ok")
    for r in results:
        for runtime in RUNTIMES:
            c = r[runtime]
            gd = f"{c['gate_drop']:.2f}" if "gate_drop" in c else "-"
            i8 = f"{c['int8']:.2f}" if "int8" in c else "-"
            dr = f"{c['drop']:.2f}" if "drop" in c else "-"
            ag = f"{c['agreement']:.2f}" if "agreement" in c else "-"
            print(f"{r['shots']:>3} {r['seed']:>4} | {runtime:>11} | {c['verdict']:>8} | {gd:>11} | "
                  f"{c['fp32']:>7.2f} | {i8:>7} | {dr:>6} | {ag:>9} | {'yes' if c['ok'] else 'NO'}")
    failures = sum(not r[rt]["ok"] for r in results for rt in RUNTIMES)
    print(f"\n{failures} INT8 model(s) kept that lost more than {args.max_drop} points or agreed on less than "
          f"{args.min_agreement}% of held-out images")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
