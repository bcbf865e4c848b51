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
    return 0


if __name__ == "__main__":
    sys.exit(main())
