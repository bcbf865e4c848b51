#!/usr/bin/env python
"""Where should the temperature come from? Out-of-fold calibration of a linear head on
frozen features, judged on every image not drawn.

    python benchmarks/calibration_probe.py elpv --size 300 --shots 10,20 --repeats 5
    python benchmarks/calibration_probe.py ../shared/datasets/neu-det --size 224 --shots 5,10,20 --repeats 5

The features are those of benchmarks/pooling_probe.py (same cache: frozen Lite0 stages
4-7, average and maximum, four quarter turns; extracted on first use), the head the
default one (a logistic regression on standardised features over the four turns of each
training image; held-out images averaged over their turns), the draws those of
benchmarks/fewshot.py. For each draw the temperature is fitted (NLL, then lineside's
Laplace cap: train/calibrate.py) on out-of-fold logits of the training images from:

- one: one split into 5 folds (what `lineside train` does);
- repeated: three different splits into 5 folds, their logits stacked;
- loo: leave one out (a head per training image);

and compared with no temperature (none) and with the temperature fitted on the held-out
images themselves (oracle: the best a single temperature can do). Printed per draw: the
held-out balanced accuracy, the out-of-fold accuracy, and each method's temperature and
expected calibration error (15 bins) on the held-out images; then each method's mean and
worst ECE.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pooling_probe import cached_features  # noqa: E402

from lineside.dataset import draw_per_class  # noqa: E402
from lineside.metrics import expected_calibration_error  # noqa: E402
from lineside.train.calibrate import cap_temperature, fit_temperature, softmax, stratified_folds  # noqa: E402
from lineside.train.heads import fit_linear_head  # noqa: E402
from lineside.train.trainer import HEAD_L2  # noqa: E402

METHODS = ("none", "one", "repeated", "loo", "oracle")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="a dataset folder or manifest, or 'elpv'")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--shots", default="10,20")
    ap.add_argument("--repeats", type=int, default=5, help="draws per number of images")
    ap.add_argument("--cache", type=Path, default=Path("/tmp"))
    args = ap.parse_args(argv)
    d = cached_features(args.data, args.size, args.cache)
    y = d["y"]
    classes = int(y.max()) + 1
    feats = np.concatenate([d["avg"], d["mx"]], 2)       # (views, images, features)
    views = feats.shape[0]

    def fit(idx):
        head = torch.nn.Linear(feats.shape[-1], classes)
        fit_linear_head(head, torch.from_numpy(feats[:, idx].reshape(-1, feats.shape[-1])).float(),
                        torch.from_numpy(np.tile(y[idx], views)).long(), HEAD_L2, True, max_iter=500)
        return lambda ids: head(torch.from_numpy(feats[:, ids].mean(0)).float()).detach().numpy()

    def out_of_fold(drawn, seed):
        fold, k = stratified_folds(y[drawn], seed, 5)
        z = np.zeros((len(drawn), classes))
        for f in range(k):
            z[fold == f] = fit(drawn[fold != f])(drawn[fold == f])
        return z

    def temperature(z, t):
        return cap_temperature(z, t, fit_temperature(z, t))

    for k in [int(s) for s in args.shots.split(",")]:
        rows = []
        for seed in range(args.repeats):
            drawn, rest = draw_per_class(y, k, seed)
            yd, yr = y[drawn], y[rest]
            splits = [out_of_fold(drawn, [seed, r]) for r in range(3)]
            loo = np.stack([fit(np.delete(drawn, i))(drawn[i:i + 1])[0] for i in range(len(drawn))])
            z = fit(drawn)(rest)
            ts = {"none": 1.0, "one": temperature(splits[0], yd),
                  "repeated": temperature(np.concatenate(splits), np.tile(yd, 3)),
                  "loo": temperature(loo, yd), "oracle": fit_temperature(z, yr)}
            row = {m: (t, expected_calibration_error(softmax(z / t), yr)) for m, t in ts.items()}
            acc = np.mean([np.mean(z[yr == c].argmax(1) == c) for c in range(classes)])
            rows.append(row)
            print(f"k={k} seed={seed}: balanced accuracy {100 * acc:.2f}%, out-of-fold accuracy "
                  f"{100 * np.mean(splits[0].argmax(1) == yd):.1f}%; "
                  + ", ".join(f"{m} T {t:.2f} ECE {e:.3f}" for m, (t, e) in row.items()), flush=True)
        for m in METHODS:
            eces = [r[m][1] for r in rows]
            print(f"== k={k} {m}: ECE mean {np.mean(eces):.3f}, worst {np.max(eces):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
