#!/usr/bin/env python
"""Which views of the training images help a linear head on middle-stage features? One row per policy.

    python benchmarks/augment_ablation.py ../shared/datasets/neu-det --shots 5,10,20 --repeats 5

For each policy and each seeded draw of k images per class (the draws of
benchmarks/fewshot.py), the recipe `lineside train` uses on NEU (`linear --taps mid`:
pooled stages 4-7 of EfficientNet-Lite0, views of each training image through the
frozen network, then the head fitted on standardised features) is fitted on that
policy's views, and balanced accuracy is measured on every image not drawn, twice:
on the image alone (`--tta off`), and averaged over the four quarter turns of the
image (test-time views, what `lineside train` does by default for this recipe).
Held-out features are computed once per turn.

A policy's views are the image's allowed flips and turns, exactly (identity first),
then randomly augmented copies up to its number of views.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lineside.dataset import load_arrays, load_image_set, scores_over_draws
from lineside.train.augment import AugmentConfig, orient
from lineside.train.backbones import BACKBONES
from lineside.train.config import TrainConfig
from lineside.train.data import to_tensor
from lineside.train.heads import INFER_BATCH
from lineside.train.trainer import Trainer, auto_views

# name: (augmentation, views per image; None = what lineside train picks)
POLICIES = {
    "flips and turns exactly (default)": (AugmentConfig(), None),
    "flips and turns + 8 augmented copies (all augmentations)": (AugmentConfig(), 16),
    "flips and turns + 8 brightness/contrast copies": (AugmentConfig(affine=0, blur=0, noise=0), 16),
    "flips and turns + 8 blur/noise copies": (AugmentConfig(affine=0, color=0), 16),
    "flips and turns + 8 affine copies": (AugmentConfig(color=0, blur=0, noise=0), 16),
    "image only": (AugmentConfig(flip=False, rot90=False), 1),
}
TURNS = (0, 1, 2, 3)


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
    shots = [int(s) for s in args.shots.split(",")]
    t0 = time.perf_counter()
    probe = Trainer(TrainConfig(strategy="linear", taps="mid"), images.classes, spec, progress=False)
    probe.model.eval()   # pretrained BatchNorm statistics, as in the exported model
    with torch.inference_mode():
        turned = torch.stack([torch.cat([
            probe.model.embed(to_tensor(np.stack([orient(im, k) for im in x[s:s + INFER_BATCH]]), probe.device))
            .float() for s in range(0, len(x), INFER_BATCH)]) for k in TURNS])
    print(f"{len(y)} images, held-out features of {len(TURNS)} turns in {time.perf_counter() - t0:.0f} s",
          flush=True)
    print(f"\n{'policy':>58} | " + " | ".join(f"{k:>2}/class: one view / test-time views (per draw)" for k in shots))
    for name in names:
        augment, views = POLICIES[name]
        cfg = TrainConfig(strategy="linear", taps="mid", augment=augment, views=views)
        trainer = Trainer(cfg, images.classes, spec, progress=False)
        cells = []
        for k in shots:
            tta = {}

            def fit_predict(drawn, rest):
                n_views = auto_views(cfg, len(drawn), True, len(trainer.orientations()))
                bank, bank_y = trainer.build_bank(x[drawn], y[drawn], len(trainer.model.stages), n_views)
                trainer.fit_head(bank, bank_y, len(trainer.model.stages))
                with torch.inference_mode():
                    tta.setdefault("acc", []).append(
                        trainer.model.head(turned[:, rest].mean(0)).argmax(1).numpy())
                    return trainer.model.head(turned[0, rest]).argmax(1).numpy()

            accs = scores_over_draws(images.targets, k, args.repeats, fit_predict)
            preds = iter(tta["acc"])
            accs_tta = scores_over_draws(images.targets, k, args.repeats, lambda d, r: next(preds))
            cells.append(f"{np.mean(accs):6.2f} / {np.mean(accs_tta):6.2f} "
                         f"({' '.join(f'{a:.2f}/{b:.2f}' for a, b in zip(accs, accs_tta))})")
        print(f"{name:>58} | " + " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
