#!/usr/bin/env python
"""Criteria for judging INT8 without labelled held-out images, against the truth, from the
.npz files of benchmarks/int8_judge.py:

    python benchmarks/int8_judge_report.py /tmp/judge

For every draw and recipe: top-1 agreement with FP32 on each judged set (plain, dihedral,
augmented), the agreement and drop predicted for unseen images from each set's margin
shifts and the run's out-of-fold margins (export/quantize.py predicted_unseen), and the
truth on the images not drawn."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from lineside.export.quantize import margin_shifts, predicted_unseen


def main(argv=None) -> int:
    folder = Path((argv or sys.argv[1:])[0])
    print(f"{'file':>62} | {'plain':>6} {'dihed':>6} {'augm':>6} | predicted from dihedral / augmented shifts "
          f"| unseen: agreement, drop")
    for f in sorted(folder.glob("*.npz")):
        d = np.load(f)
        agree = {s: 100 * np.mean(d[f"{s}_fp32"].argmax(1) == d[f"{s}_int8"].argmax(1))
                 for s in ("plain", "dihedral", "augmented", "unseen")}
        y = d["unseen_y"]
        labels = range(d["unseen_fp32"].shape[1])
        rec32 = [np.mean(d["unseen_fp32"].argmax(1)[y == c] == c) for c in labels]
        rec8 = [np.mean(d["unseen_int8"].argmax(1)[y == c] == c) for c in labels]
        drop = 100 * (np.mean(rec32) - np.mean(rec8))
        pred = ""
        if "oof_logits" in d:
            for s in ("dihedral", "augmented"):
                p = predicted_unseen(margin_shifts(d[f"{s}_fp32"], d[f"{s}_int8"]), d["oof_logits"], d["oof_labels"],
                                     labels)
                pred += f" {100 * p['agreement']:6.2f} ({p['drop_points']:+.2f})"
        print(f"{f.stem:>62} | {agree['plain']:6.2f} {agree['dihedral']:6.2f} {agree['augmented']:6.2f} |"
              f"{pred:>42} | {agree['unseen']:6.2f} {drop:+.2f}")
    print("\nThe gate as `lineside export RUN --out B` decides it (recipes in order, the first whose estimate passes "
          "0.3 points and 99.5% is kept), against the truth on the images not drawn:")
    from lineside.export.bundle import ORT_RECIPES, RECIPES

    order = {"openvino": [n for n, _ in RECIPES], "onnxruntime": [n for n, _ in ORT_RECIPES]}
    failures = 0
    for draw in sorted({tuple(f.stem.split("_")[:3]) for f in folder.glob("*.npz")}):
        for runtime, recipes in order.items():
            verdict, text = "refused", ""
            for recipe in recipes:
                f = folder / f"{'_'.join(draw)}_{runtime}_{recipe}.npz"
                if not f.exists() or "oof_logits" not in np.load(f):
                    continue
                d = np.load(f)
                labels = range(d["unseen_fp32"].shape[1])
                est = predicted_unseen(margin_shifts(d["augmented_fp32"], d["augmented_int8"]), d["oof_logits"],
                                       d["oof_labels"], labels)
                y = d["unseen_y"]
                agree = 100 * np.mean(d["unseen_fp32"].argmax(1) == d["unseen_int8"].argmax(1))
                drop = 100 * (np.mean([np.mean(d["unseen_fp32"].argmax(1)[y == c] == c) for c in labels])
                              - np.mean([np.mean(d["unseen_int8"].argmax(1)[y == c] == c) for c in labels]))
                text += (f" {recipe}: estimated {100 * est['agreement']:.2f}% ({est['drop_points']:+.2f}), "
                         f"truth {agree:.2f}% ({drop:+.2f});")
                if est["drop_points"] <= 0.3 and 100 * est["agreement"] >= 99.5:
                    verdict = "kept"
                    ok = drop <= 0.3 and agree >= 99.5
                    failures += not ok
                    text += " KEPT" + ("" if ok else " (FAILURE: the truth misses the limits)")
                    break
            print(f"{' '.join(draw):>16} {runtime:>11} {verdict:>7} |{text}")
    print(f"{failures} INT8 model(s) kept that miss 0.3 points / 99.5% on the images not drawn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
