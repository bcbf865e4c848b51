#!/usr/bin/env python
"""Which depth of a frozen backbone separates the classes best? A linear probe per set of stages.

    python benchmarks/feature_taps.py ../shared/datasets/neu-det --shots 5,10,20 --repeats 3

Every image goes once through the frozen ImageNet backbone (no augmentation); each
stage's output is average-pooled to one vector. For each set of stages, k images per
class are drawn (the same seeded draws as benchmarks/fewshot.py), a multinomial
logistic regression (L-BFGS, L2, on standardised features) is fitted on the
concatenated vectors, and balanced accuracy is measured on every image not drawn.

The last stage is what `linear` and `finetune` use today; texture-like defects may be
better separated by middle stages, and this measures it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lineside.dataset import load_arrays, load_image_set, scores_over_draws
from lineside.train.backbones import build_backbone
from lineside.train.model import Classifier
from lineside.train.heads import fit_probe, pooled_stage_features


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--shots", default="5,10,20")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sets", default=None,
                    help="Stage sets to probe, e.g. '8;7;6;5,6,7;4,5,6,7' (default: each of the last four "
                         "stages, then growing sets ending at the second-to-last stage).")
    ap.add_argument("--pool", choices=("avg", "avgmax"), default="avg",
                    help="each stage's average, or its average and maximum (what a head on taps reads)")
    ap.add_argument("--l2", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    entry, backbone = build_backbone(args.backbone)
    images = load_image_set(args.data)
    model = Classifier(backbone, entry.feature_dim, len(images.classes), entry.input_spec)
    t0 = time.perf_counter()
    x, images, _ = load_arrays(images, entry.input_spec, progress=False)
    y = np.array(images.targets)
    feats = pooled_stage_features(model, x, torch.device("cpu"), pool=args.pool)
    print(f"{len(y)} images, {len(feats)} stages (widths {[f.shape[1] for f in feats]}), "
          f"features in {time.perf_counter() - t0:.0f} s", flush=True)
    n = len(feats)
    if args.sets:
        sets = [[int(s) for s in part.split(",")] for part in args.sets.split(";")]
    else:
        sets = [[n - 1], [n - 2], [n - 3], [n - 4], [n - 3, n - 2], [n - 4, n - 3, n - 2],
                [n - 5, n - 4, n - 3, n - 2]]
    shots = [int(s) for s in args.shots.split(",")]
    print(f"\n{'stages':>16} | " + " | ".join(f"{k:>2}/class mean ± std" for k in shots))
    for stages in sets:
        xs = np.concatenate([feats[s] for s in stages], 1)
        cells = []
        for k in shots:
            accs = scores_over_draws(images.targets, k, args.repeats, lambda d, r: fit_probe(
                xs[d], y[d], len(images.classes), args.l2, max_iter=500)(xs[r]))
            cells.append(f"{np.mean(accs):>9.2f}% ± {np.std(accs):4.2f}")
        print(f"{','.join(map(str, stages)):>16} | " + " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
