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

from lineside.dataset import draw_per_class, load_arrays, load_image_set
from lineside.metrics import classification_report
from lineside.train.backbones import build_backbone


def stage_features(backbone, spec, x: np.ndarray, batch: int = 50) -> list[np.ndarray]:
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
    out = [[] for _ in backbone.stages]
    with torch.no_grad():
        for i in range(0, len(x), batch):
            h = (torch.from_numpy(x[i:i + batch]).permute(0, 3, 1, 2).float() - mean) / std
            for k, stage in enumerate(backbone.stages):
                h = stage(h)
                out[k].append(h.mean((2, 3)).numpy())
    return [np.concatenate(f) for f in out]


def probe(x_train, y_train, x_test, classes: int, l2: float) -> np.ndarray:
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    xt = torch.from_numpy((x_train - mu) / sd).float()
    head = torch.nn.Linear(xt.shape[1], classes)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=500, history_size=20, line_search_fn="strong_wolfe")
    yt = torch.from_numpy(y_train).long()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(xt), yt) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return head(torch.from_numpy((x_test - mu) / sd).float()).argmax(1).numpy()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--shots", default="5,10,20")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sets", default=None,
                    help="Stage sets to probe, e.g. '8;7;6;5,6,7;4,5,6,7' (default: each of the last four "
                         "stages, then growing sets ending at the second-to-last stage).")
    ap.add_argument("--l2", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    entry, backbone = build_backbone(args.backbone)
    backbone.eval()
    images = load_image_set(args.data)
    t0 = time.perf_counter()
    x, images, _ = load_arrays(images, entry.input_spec, progress=False)
    y = np.array(images.targets)
    feats = stage_features(backbone, entry.input_spec, x)
    print(f"{len(y)} images, {len(feats)} stages (widths {[f.shape[1] for f in feats]}), "
          f"features in {time.perf_counter() - t0:.0f} s", flush=True)
    n = len(feats)
    if args.sets:
        sets = [[int(s) for s in part.split(",")] for part in args.sets.split(";")]
    else:
        sets = [[n - 1], [n - 2], [n - 3], [n - 4], [n - 3, n - 2], [n - 4, n - 3, n - 2],
                [n - 5, n - 4, n - 3, n - 2]]
    shots = [int(s) for s in args.shots.split(",")]
    labels = [str(c) for c in range(len(images.classes))]
    print(f"\n{'stages':>16} | " + " | ".join(f"{k:>2}/class mean ± std" for k in shots))
    for stages in sets:
        xs = np.concatenate([feats[s] for s in stages], 1)
        cells = []
        for k in shots:
            accs = []
            for seed in range(args.repeats):
                drawn, rest = draw_per_class(images.targets, k, seed)
                pred = probe(xs[drawn], y[drawn], xs[rest], len(images.classes), args.l2)
                accs.append(100 * classification_report(y[rest], pred, labels)["balanced_accuracy"])
            cells.append(f"{np.mean(accs):>9.2f}% ± {np.std(accs):4.2f}")
        print(f"{','.join(map(str, stages)):>16} | " + " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
