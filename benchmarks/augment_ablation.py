#!/usr/bin/env python
"""Which augmentations help a linear head on middle-stage features? One row per policy.

    python benchmarks/augment_ablation.py ../shared/datasets/neu-det --shots 5,10,20 --repeats 3

For each policy and each seeded draw of k images per class (the draws of
benchmarks/fewshot.py), the recipe `lineside train` uses on NEU (`linear --taps mid`:
pooled stages 4-7 of EfficientNet-Lite0, views of each training image through the
frozen network, then the L-BFGS head) is fitted with that policy's augmented views,
and balanced accuracy is measured on every image not drawn. The held-out images'
features are computed once, without augmentation, as the exported model sees them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lineside.dataset import load_arrays, load_image_set, scores_over_draws
from lineside.train.augment import AugmentConfig
from lineside.train.backbones import BACKBONES
from lineside.train.config import TrainConfig
from lineside.train.trainer import INFER_BATCH, Trainer, auto_views, to_tensor

POLICIES = {
    "default": AugmentConfig(),
    "no augmentation": None,
    "flips and turns": AugmentConfig(affine=0, color=0, blur=0, noise=0),
    "flips and turns + affine": AugmentConfig(color=0, blur=0, noise=0),
    "flips and turns + brightness and contrast": AugmentConfig(affine=0, blur=0, noise=0),
    "flips and turns + blur": AugmentConfig(affine=0, color=0, noise=0),
    "flips and turns + noise": AugmentConfig(affine=0, color=0, blur=0),
    "default without turns": AugmentConfig(rot90=False),
    "default without flips or turns": AugmentConfig(flip=False, rot90=False),
    "flips only": AugmentConfig(rot90=False, affine=0, color=0, blur=0, noise=0),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("--shots", default="5,10,20")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--policies", default=None, help=f"Comma-separated subset of: {', '.join(POLICIES)}")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [p.strip() for p in args.policies.split(",")] if args.policies else list(POLICIES)
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        sys.exit(f"--policies: unknown {', '.join(unknown)}")
    spec = BACKBONES.get("efficientnet_lite0").input_spec
    images = load_image_set(args.data)
    x, images, _ = load_arrays(images, spec, progress=False)
    y = np.array(images.targets)
    labels = [str(c) for c in range(len(images.classes))]
    shots = [int(s) for s in args.shots.split(",")]
    t0 = time.perf_counter()
    probe = Trainer(TrainConfig(strategy="linear", taps="mid"), images.classes, spec, progress=False)
    probe.model.eval()   # pretrained BatchNorm statistics, as in the exported model
    with torch.inference_mode():
        feats = torch.cat([probe.model.embed(to_tensor(x[s:s + INFER_BATCH], probe.device)).float()
                           for s in range(0, len(x), INFER_BATCH)])
    print(f"{len(y)} images, held-out features in {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"\n{'policy':>42} | " + " | ".join(f"{k:>2}/class: mean (per draw)" for k in shots))
    for name in names:
        policy = POLICIES[name]
        cfg = TrainConfig(strategy="linear", taps="mid", augment=policy or AugmentConfig())
        trainer = Trainer(cfg, images.classes, spec, progress=False)
        trainer.class_weights = torch.ones(len(labels))
        cells = []
        for k in shots:
            def fit_predict(drawn, rest):
                views = 1 if policy is None else auto_views(cfg, len(drawn))
                bank, bank_y = trainer._build_bank(x[drawn], y[drawn], len(trainer.model.stages), views)
                trainer._fit_head(bank, bank_y, len(trainer.model.stages))
                with torch.inference_mode():
                    return trainer.model.head(feats[rest]).argmax(1).numpy()

            accs = scores_over_draws(images.targets, k, args.repeats, fit_predict)
            cells.append(f"{np.mean(accs):6.2f} ({' '.join(f'{a:.2f}' for a in accs)})")
        print(f"{name:>42} | " + " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
