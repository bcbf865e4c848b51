#!/usr/bin/env python
"""How should an anomaly model judge a patch? The bank of good patches (PatchCore: the
distance to the nearest good patch from anywhere in the image), a Gaussian per grid
position (PaDiM: the Mahalanobis distance to the good patches seen at that place), or
both added, each in units of a typical good part ("both (512)": the default from 10 good
images on; below, too few for the Gaussians, the default is the bank). Image AUROC on the
same patch features and draws, so the scorers differ only in how they judge.

    python benchmarks/anomaly_scorers.py bottle --goods 8,32 --draws 3
    python benchmarks/anomaly_scorers.py elpv --goods 32,200 --draws 3     # pip install elpv-dataset
    python benchmarks/anomaly_scorers.py neu --goods 8,32 --draws 2        # each class in turn as the good one

`bottle` draws the good images from MVTec AD bottle's train/good and tests on test/
(20 good, 63 defective). `elpv` draws functional cells and tests on 600 of the other
cells (functional and defective, a seeded draw). `neu` takes each of the six NEU
classes in turn as the good parts and tests on 600 of the other images. Features are
computed once per image (frozen EfficientNet-Lite0, stages 3 and 5 at 256x256, the
shipped taps and size); each draw weighs the stages and fits the principal axes on its
own good images, as training does.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import open_benchmark_data  # noqa: E402

from lineside.dataset import ImageSet, load_arrays, load_image_set  # noqa: E402
from lineside.metrics import auroc  # noqa: E402
from lineside.train import anomaly as A  # noqa: E402
from lineside.train.backbones import BACKBONES, build_backbone  # noqa: E402
from lineside.train.model import stage_widths  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
TEST = 600
# name: (scorer, bank size, mix rule)
VARIANTS = {"bank (2048)": ("bank", 2048, None), "gaussian": ("gaussian", 0, None),
            "both (512)": ("both", 512, "median"), "both (2048)": ("both", 2048, "median"),
            "both (512), also / spread": ("both", 512, "spread")}


def features(paths, spec) -> tuple[torch.Tensor, list[int]]:
    """(N, P, C) float16 patch features of the shipped taps (before weighing and
    projection) and the grid."""
    _, net = build_backbone("efficientnet_lite0")
    widths = stage_widths(net)
    model = A.AnomalyModel(net.stages, spec, A.DEFAULT_TAPS, sum(widths[t] for t in A.DEFAULT_TAPS), 1).eval()
    out = []
    for s in range(0, len(paths), 256):
        chunk = paths[s:s + 256]
        x = load_arrays(ImageSet(tuple(chunk), tuple([0] * len(chunk)), ("x",), Path(".")), spec, progress=False)[0]
        out.append(A.extract(model, x, "cpu").half())
    return torch.cat(out), [widths[t] for t in A.DEFAULT_TAPS]


def sets(name: str, goods: int, seed: int, y: np.ndarray, pool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if pool is not None:      # bottle: train/good to draw from, test/ to test on
        return np.sort(rng.permutation(pool)[:goods]), np.arange(len(pool), len(y))
    train = np.sort(rng.permutation(np.flatnonzero(y == 0))[:goods])
    rest = np.setdiff1d(np.arange(len(y)), train)
    return train, np.sort(rng.permutation(rest)[:TEST])


def projected(feats, widths, train, seed):
    """Each tap weighed alike and the good patches' principal axes, as good_features does."""
    f = feats[torch.from_numpy(train)].float()
    w = torch.ones(f.shape[-1])
    edges = np.cumsum([0, *widths])
    for a, b in zip(edges[:-1], edges[1:]):
        w[a:b] = 1.0 / float(f[..., a:b].pow(2).sum(-1).mean().sqrt())
    axes = A.principal_axes((f * w).reshape(-1, f.shape[-1]), A.DEFAULT_PROJECT, seed)
    return lambda idx: (feats[torch.from_numpy(idx)].float() * w) @ axes


def judge(ftr, fte, grid, scorer, bank, rule, seed) -> np.ndarray:
    """Test image scores of one variant, its mix from the good images' out-of-fold scores."""
    radius = A.gaussian_radius(len(ftr), ftr.shape[-1], grid)
    parts = A.distance_parts(fte, A.fit_memory(ftr, grid, scorer, bank, seed, "cpu", radius), "cpu")
    if len(parts) == 1:
        return A.image_scores(parts, [1.0], grid)
    fold = torch.from_numpy(A.folds_of(len(ftr), A.FOLDS, seed))
    oof = [np.empty(len(ftr)) for _ in parts]
    for f in range(A.FOLDS):
        held = fold == f
        got = A.distance_parts(ftr[held], A.fit_memory(ftr[~held], grid, scorer, bank, seed + f, "cpu", radius),
                               "cpu")
        for whole, part in zip(oof, got):
            whole[held.numpy()] = A.image_scores([part], [1.0], grid)
    mix = [A.mix_weight(o) / (np.log(o).std() if rule == "spread" else 1.0) for o in oof]
    return A.image_scores(parts, mix, grid)


def data(name: str):
    """[(label, paths, y: 1 = defect, pool of training images or None)]."""
    if name == "bottle":
        root = SHARED / "mvtec-bottle"
        train, test = load_image_set(root / "train", min_classes=1), load_image_set(root / "test")
        good = test.classes.index("good")
        y = np.r_[np.zeros(len(train.paths), int), [int(t != good) for t in test.targets]]
        return [("bottle", list(train.paths) + list(test.paths), y, np.arange(len(train.paths)))]
    if name == "neu":
        d = load_image_set(SHARED / "neu-det")
        return [(f"neu {c}", list(d.paths), (np.asarray(d.targets) != i).astype(int), None)
                for i, c in enumerate(d.classes)]
    d = open_benchmark_data(name)
    ok = d.classes.index("functional" if name == "elpv" else "good")
    return [(name, list(d.paths), (np.asarray(d.targets) != ok).astype(int), None)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="bottle, elpv, neu, or a folder with a good class")
    p.add_argument("--goods", default="8,32")
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    spec = replace(BACKBONES.get("efficientnet_lite0").input_spec, height=256, width=256)
    sets_ = data(a.data)
    feats, widths = features(sets_[0][1], spec)   # every set of one dataset shares its images
    side = int(round(feats.shape[1] ** 0.5))
    grid = (side, side)
    rows = []
    for label, _, y, pool in sets_:
        for k in (int(v) for v in a.goods.split(",")):
            res = {v: [] for v in VARIANTS}
            for seed in range(a.draws):
                train, test = sets(a.data, k, seed, y, pool)
                proj = projected(feats, widths, train, seed)
                ftr, fte = proj(train), proj(test)
                for v, (scorer, bank, rule) in VARIANTS.items():
                    res[v].append(100 * auroc(y[test], judge(ftr, fte, grid, scorer, bank, rule, seed)))
            row = {"data": label, "goods": k, **{v: [round(s, 1) for s in r] for v, r in res.items()}}
            rows.append(row)
            if not a.json:
                print(f"{label} {k}: " + "; ".join(f"{v} {np.mean(r):.1f} {[round(s, 1) for s in r]}"
                                                   for v, r in res.items()), flush=True)
    if a.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
