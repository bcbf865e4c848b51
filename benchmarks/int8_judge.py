#!/usr/bin/env python
"""Which judgement of INT8, made without labelled held-out images, predicts what INT8
does to images it never saw?

For each draw: k training images per class, `lineside train` with its defaults, an FP32
export; half of the training images of each class calibrate each INT8 recipe (with the
gate's augmented copies), and FP32 and INT8 are compared on
  plain     the other half, as they are;
  dihedral  the other half in the eight flips and turns (those the run allowed);
  augmented the other half and augmented copies of it, as the gate judges today;
  unseen    every image not drawn (the truth the others try to predict).
The probabilities of both models on every set, and the run's out-of-fold logits of the
training images (train/calibrate.py), are saved (one .npz per draw and recipe)
so that any criterion can be computed from them afterwards; the printed table gives top-1
agreement and balanced-accuracy drop on each set.

    python benchmarks/int8_judge.py ../shared/datasets/neu-det --shots 10 --repeats 3 --out /tmp/judge
    python benchmarks/int8_judge.py elpv --shots 10 --repeats 3 --out /tmp/judge
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

from lineside.dataset import draw_per_class, load_arrays, stratified_split  # noqa: E402
from lineside.metrics import classification_report  # noqa: E402


def sets_for(x, y, judge, augment, group):
    from lineside.export.bundle import judge_views
    from lineside.train.augment import orient

    xj, yj = x[judge], y[judge]
    dihedral = np.concatenate([np.stack([orient(im, k) for im in xj]) if k else xj for k in group])
    augmented, y_aug, _, _ = judge_views(xj, yj, [str(i) for i in range(len(xj))], augment, "", "")
    return {"plain": (xj, yj), "dihedral": (dihedral, np.tile(yj, len(group))), "augmented": (augmented, y_aug)}


def compare(p32, p8, y, labels) -> dict:
    b32 = classification_report(y, p32.argmax(1), labels)["balanced_accuracy"]
    b8 = classification_report(y, p8.argmax(1), labels)["balanced_accuracy"]
    return {"n": int(len(y)), "agreement": round(100 * float(np.mean(p32.argmax(1) == p8.argmax(1))), 3),
            "drop": round(100 * (b32 - b8), 3)}


def main(argv=None) -> int:
    from lineside.export.bundle import (ORT_RECIPES, RECIPES, _run_augment, export_bundle, with_augmented_copies)
    from lineside.export.quantize import quantize_onnxruntime, quantize_openvino
    from lineside.runtime.model import open_model
    from lineside.train.augment import orientations
    from lineside.train.config import TrainConfig
    from lineside.train.run import train_run

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--shots", default="10")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True, help="folder for the .npz files and results.json")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    images = open_benchmark_data(args.data)
    name = "elpv" if str(args.data) == "elpv" else Path(args.data).name
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for k in [int(s) for s in args.shots.split(",")]:
            for seed in range(args.repeats):
                drawn, rest = draw_per_class(images.targets, k, seed)
                train_csv = images.write_manifest(tmp / f"train_{k}_{seed}.csv", drawn)
                run, bundle = tmp / f"run_{k}_{seed}", tmp / f"bundle_{k}_{seed}"
                t0 = time.perf_counter()
                m = train_run(train_csv, run, TrainConfig().override(seed=seed), progress=False)
                train_s = round(time.perf_counter() - t0, 1)
                temperature = (m.get("calibration") or {}).get("temperature", 1.0)
                oof = dict(np.load(run / "out_of_fold.npz")) if (run / "out_of_fold.npz").exists() else {}
                export_bundle(run, bundle, int8=False, speed_seconds=0)
                fp = {"openvino": open_model(bundle, backend="openvino"),
                      "onnxruntime": open_model(bundle, backend="onnxruntime")}
                spec, labels = fp["openvino"].spec, list(fp["openvino"].labels)
                x, kept, _ = load_arrays(images.subset(drawn), spec, progress=False)
                y = np.asarray(kept.targets)
                x_rest, kept_rest, _ = load_arrays(images.subset(rest), spec, progress=False)
                y_rest = np.asarray(kept_rest.targets)
                cal, judge = stratified_split(y, 0.5, 0)
                augment = _run_augment(run)
                group = orientations(augment.flip, augment.rot90, spec.height == spec.width)
                sets = sets_for(x, y, judge, augment, group)
                sets["unseen"] = (x_rest, y_rest)
                calib = with_augmented_copies(x[cal], augment)
                meta = fp["openvino"].metadata.with_precision("int8")
                recipes = [("openvino", n, r) for n, r in RECIPES] + [("onnxruntime", n, r) for n, r in ORT_RECIPES]
                for runtime, recipe_name, recipe in recipes:
                    if runtime == "openvino":
                        path = quantize_openvino(bundle / "model_fp32.xml", tmp / "q.xml", calib, meta, recipe)
                    else:
                        path = quantize_onnxruntime(bundle / "model_fp32.onnx", tmp / "q.onnx", calib, meta, recipe)
                    q = open_model(path, backend=runtime, precision="int8")
                    row = {"data": name, "shots": k, "seed": seed, "strategy": m["strategy"], "runtime": runtime,
                           "recipe": recipe_name, "train_s": train_s, "temperature": temperature}
                    arrays = {f"oof_{key}": v for key, v in oof.items()}
                    arrays["temperature"] = np.float64(temperature)
                    for set_name, (xs, ys) in sets.items():
                        p32, p8 = fp[runtime].predict_proba(xs), q.predict_proba(xs)
                        row[set_name] = compare(p32, p8, ys, labels)
                        arrays.update({f"{set_name}_fp32": p32, f"{set_name}_int8": p8, f"{set_name}_y": ys})
                    np.savez_compressed(args.out / f"{name}_{k}_{seed}_{runtime}_{recipe_name}.npz", **arrays)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{'data':>6} {'k':>3} {'seed':>4} {'runtime':>11} {'recipe':>42} | agreement (drop) on: "
          f"plain, dihedral, augmented | unseen")
    for r in rows:
        cells = " ".join(f"{r[s]['agreement']:6.2f} ({r[s]['drop']:+.2f})" for s in ("plain", "dihedral", "augmented"))
        print(f"{r['data']:>6} {r['shots']:>3} {r['seed']:>4} {r['runtime']:>11} {r['recipe']:>42} | {cells} | "
              f"{r['unseen']['agreement']:6.2f} ({r['unseen']['drop']:+.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
