#!/usr/bin/env python
"""How far can --unlabelled's good-parts layer go on a dataset with a good class? The
split-half protocol of benchmarks/unlabelled.py, a linear head on the middle stages
pinned, each draw trained once with --unlabelled; then, on the scored half:

    python benchmarks/good_parts_ceiling.py elpv --shots 10,20 --repeats 3
    python benchmarks/good_parts_ceiling.py elpv --variants "224:3,5;320:3,5;224:2,3,5" --seeds 0

alone      the classifier alone (the run's classifier inside the combined model)
model      the model the run wrote (the layer in the form cross-validation chose)
stack      the layer weighing the classifier's logits and the distance, fitted as training does
split      the distance alone deciding good or defective, fitted as training does
best w=W   ceilings: the best balanced accuracy any threshold reaches on the scored half
           itself on (standardised) -log distance + W x (standardised) logit margin; W=0
           is the distance alone (two classes only)
auc        the distance's AUROC, good against defective

--variants instead fits the anomaly model of good parts on the unlabelled images that are
truly good (labels the run never has; the question is which model of them separates best)
at other input sizes and stages (SIZE:STAGES[:BACKBONE], ';'-separated), and prints the
AUROC of each on the scored half.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import open_benchmark_data  # noqa: E402
from unlabelled import link_folder, split  # noqa: E402

import lineside.train.anomaly as A  # noqa: E402
import lineside.train.unlabelled as U  # noqa: E402
from lineside.dataset import load_arrays, load_image_set  # noqa: E402
from lineside.metrics import balanced_accuracy  # noqa: E402
from lineside.train.checkpoint import load_checkpoint  # noqa: E402
from lineside.train.config import TrainConfig  # noqa: E402
from lineside.train.run import train_run  # noqa: E402
from lineside.train.trainer import score  # noqa: E402

WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0)


def auroc(bad: np.ndarray, s: np.ndarray) -> float:
    order = np.argsort(s, kind="stable")
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    n1, n0 = int(bad.sum()), int((~bad).sum())
    return float((ranks[bad].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def best_threshold(s: np.ndarray, y: np.ndarray, ok: int) -> float:
    calls = [np.where(s > t, ok, 1 - ok) for t in np.quantile(s, np.linspace(0.01, 0.99, 197))]
    return max(balanced_accuracy(y, c) for c in calls)


def captured_training(train_csv, out, folder, seed):
    """Train with --unlabelled, keeping what the good-parts step saw: its anomaly model, the
    held rows' images and the layer's inputs on them."""
    cap, fit0, stack0 = {}, A.fit_anomaly, U.choose_layer

    def fit(*a, **k):
        result = fit0(*a, **k)
        cap["scorer"] = result.model
        return result

    def choose(inputs, y, *a, **k):
        cap["inputs"], cap["y"] = inputs, y
        return stack0(inputs, y, *a, **k)

    A.fit_anomaly, U.choose_layer = fit, choose
    try:
        train_run(train_csv, out, TrainConfig(seed=seed, strategy="linear", taps="mid"), progress=False,
                  unlabelled=folder)
    finally:
        A.fit_anomaly, U.choose_layer = fit0, stack0
    return cap


def ceiling(images, k: int, seed: int) -> dict:
    lab, unl, sc = split(images.targets, k, seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_csv = images.write_manifest(tmp / "train.csv", lab)
        test_csv = images.write_manifest(tmp / "test.csv", sc)
        cap = captured_training(train_csv, tmp / "run", link_folder(images, unl, tmp / "unl"), seed)
        loaded = load_checkpoint(tmp / "run")
        model = loaded.model
        if not hasattr(model, "scorer"):
            return {"k": k, "seed": seed, "layer": "not used"}
        x, ds, _ = load_arrays(load_image_set(test_csv), loaded.spec, progress=False)
    y, ok, classes = np.asarray(ds.targets), model.ok, model.head.out_features
    logits = score(model.classifier, x, "cpu", logits=True)
    dist = np.log(np.maximum(A.anomaly_scores(cap["scorer"], x, "cpu"), 1e-6))
    inputs = np.concatenate([logits, dist[:, None]], 1).astype(np.float32)
    row = {"k": k, "seed": seed, "layer": "split" if model.split else "stack",
           "alone": balanced_accuracy(y, logits.argmax(1)),
           "model": balanced_accuracy(y, score(model, x, "cpu", logits=True).argmax(1))}
    for form, is_split in (("stack", False), ("split", True)):
        head = U.fit_layer(cap["inputs"], cap["y"], classes, ok, is_split)
        row[form] = balanced_accuracy(y, U.apply_layer(head, inputs, ok, is_split).argmax(1))
    row["auc"] = auroc(y != ok, dist)
    if classes == 2:
        z = lambda v: (v - v.mean()) / v.std()  # noqa: E731
        margin = z(logits[:, ok] - logits[:, 1 - ok])
        for w in WEIGHTS:
            row[f"best w={w:g}"] = best_threshold(-z(dist) + w * margin, y, ok)
    return row


def variants(images, spec_text: str, seed: int, k: int) -> list[dict]:
    from lineside.train.backbones import build_backbone

    lab, unl, sc = split(images.targets, k, seed)
    targets = np.asarray(images.targets)
    ok = U.good_class(images.classes, None)
    rows = []
    for v in spec_text.split(";"):
        size, taps, *bb = v.split(":")
        backbone = bb[0] if bb else "efficientnet_lite0"
        spec = dataclasses.replace(build_backbone(backbone)[0].input_spec, height=int(size), width=int(size))
        x_good = load_arrays(images.subset(unl[targets[unl] == ok]), spec, progress=False)[0]
        x, ds, _ = load_arrays(images.subset(sc), spec, progress=False)
        fit = A.fit_anomaly(x_good, spec, backbone, "imagenet", taps=tuple(int(t) for t in taps.split(",")),
                            seed=seed, scorer=U.GOOD_PARTS_SCORER)
        rows.append({"variant": v, "seed": seed, "auc": auroc(np.asarray(ds.targets) != ok,
                                                               A.anomaly_scores(fit.model, x, "cpu"))})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="a dataset folder or manifest with a good class, or 'elpv'")
    p.add_argument("--shots", default="10,20", help="labelled images per class (comma-separated)")
    p.add_argument("--repeats", type=int, default=3, help="draws per shot count")
    p.add_argument("--seeds", default=None, help="these draws instead of 0..repeats-1 (comma-separated)")
    p.add_argument("--variants", default=None, help="SIZE:STAGES[:BACKBONE];... (see above)")
    args = p.parse_args()
    torch.set_num_threads(2)
    images = open_benchmark_data(args.data)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(range(args.repeats))
    for k in (int(s) for s in args.shots.split(",")):
        for seed in seeds:
            rows = variants(images, args.variants, seed, k) if args.variants else [ceiling(images, k, seed)]
            for row in rows:
                print(json.dumps({a: round(b, 4) if isinstance(b, float) else b for a, b in row.items()}), flush=True)


if __name__ == "__main__":
    main()
