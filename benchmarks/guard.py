#!/usr/bin/env python
"""Does `lineside train --guard` catch more defects at the same false-reject rate?

For each k and draw, k labelled images per class are drawn (seeded, as
benchmarks/fewshot.py draws them) and `lineside train` runs twice on them: the
classifier alone, and with --guard (an anomaly model of the good class). Every image not
drawn is scored by both, at the verdict level: a good part is falsely rejected when its
label is not the good class, a defect detected when its label is not the good class.

The guard adds rejects of its own, so the fair comparison is at the same false-reject
rate: the classifier alone is also scored with its threshold on p(good) moved until it
rejects as many good parts as the guarded model does ("alone, same FR").

    python benchmarks/guard.py elpv --shots 10,20 --repeats 3          # pip install elpv-dataset
    python benchmarks/guard.py bottle.csv --train-classes good,broken_large --shots 10 --repeats 3

--train-classes trains on those classes only and scores every class: the defects of the
other classes are kinds nobody labelled (on MVTec AD bottle, a manifest of train/good and
every test/ folder: trained on good and broken_large, scored on broken_small and
contamination too).
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

from lineside.dataset import draw_per_class, load_arrays  # noqa: E402
from lineside.train.anomaly import anomaly_scores  # noqa: E402
from lineside.train.checkpoint import load_checkpoint  # noqa: E402
from lineside.train.config import TrainConfig  # noqa: E402
from lineside.train.guard import combine  # noqa: E402
from lineside.train.run import train_run  # noqa: E402
from lineside.train.trainer import score  # noqa: E402


def rates(ng: np.ndarray, is_good: np.ndarray) -> tuple[float, float]:
    """(false-reject rate of the good parts, detection rate of the others)."""
    return float(ng[is_good].mean()), float(ng[~is_good].mean())


def one_draw(images, k: int, seed: int, good: str, tmp: Path, train_classes=None) -> dict:
    drawn, rest = draw_per_class(images.targets, k, seed)
    if train_classes:      # the other classes' drawn images are scored too: none of them trains
        keep = np.isin(np.asarray(images.targets)[drawn], [images.classes.index(c) for c in train_classes])
        rest = np.sort(np.concatenate([rest, drawn[~keep]]))
        drawn = drawn[keep]
    train_csv = images.write_manifest(tmp / f"train_{k}_{seed}.csv", drawn)
    cfg = TrainConfig(seed=seed)
    t0 = time.perf_counter()
    train_run(train_csv, tmp / f"guard_{k}_{seed}", cfg, progress=False, guard=0.01)
    train_s = time.perf_counter() - t0
    loaded = load_checkpoint(tmp / f"guard_{k}_{seed}")
    model = loaded.model
    x, kept, _ = load_arrays(images.subset(rest), loaded.spec, progress=False)
    ok = loaded.labels.index(good)                   # in the model's labels (--train-classes: fewer)
    ok_data = images.classes.index(good)             # in the data's
    is_good = np.asarray(kept.targets) == ok_data
    # the inner classifier is the one `lineside train` makes without --guard (same seed, same steps)
    logits = score(model.inner, x, logits=True)
    s = anomaly_scores(model.guard, x)
    guarded = combine(logits, s, float(model.guard.threshold), ok).argmax(1) != ok
    alone = logits.argmax(1) != ok
    fr_g, det_g = rates(guarded, is_good)
    fr_a, det_a = rates(alone, is_good)
    z = logits - logits.max(1, keepdims=True)
    p_good = np.exp(z[:, ok]) / np.exp(z).sum(1)
    if fr_g > 0:                                    # rejects fr_g of the good parts
        same_fr = p_good <= np.quantile(p_good[is_good], fr_g)
    else:                                           # rejects none: below the least sure good part
        same_fr = p_good < p_good[is_good].min()
    fr_s, det_s = rates(same_fr, is_good)
    labels = np.asarray(kept.targets)
    per_class = {images.classes[c]: float(guarded[labels == c].mean()) for c in np.unique(labels) if c != ok_data}
    per_class_alone = {images.classes[c]: float(same_fr[labels == c].mean()) for c in np.unique(labels)
                       if c != ok_data}
    return {"shots": k, "seed": seed, "scored": int(len(x)), "train_s": round(train_s, 1),
            "detection_per_class": {"guarded": per_class, "alone_same_fr": per_class_alone},
            "alone": {"false_reject": fr_a, "detection": det_a},
            "guarded": {"false_reject": fr_g, "detection": det_g,
                        "guard_flags_good": float((s[is_good] > float(model.guard.threshold)).mean())},
            "alone_same_fr": {"false_reject": fr_s, "detection": det_s}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="a dataset folder or manifest with a good class, or 'elpv'")
    ap.add_argument("--good", default=None, help="the good class [functional for elpv, else good]")
    ap.add_argument("--shots", default="10,20")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-classes", help="train on these classes only (comma-separated); score every class")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    images = open_benchmark_data(args.data)
    good = args.good or ("functional" if "functional" in images.classes else "good")
    shots = [int(v) for v in args.shots.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in shots:
            for seed in range(args.repeats):
                rows.append(one_draw(images, k, seed, good, Path(tmp),
                                     args.train_classes.split(",") if args.train_classes else None))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print(f"\n{'per class':>9} | {'alone: FR / detection':>22} | {'guarded: FR / detection':>24} | "
          f"{'alone at the same FR':>20} | guard's FR on good parts (target 1%)")
    for k in shots:
        r = [x for x in rows if x["shots"] == k]

        def pair(key):
            return (f"{100 * np.mean([x[key]['false_reject'] for x in r]):5.1f}% / "
                    f"{100 * np.mean([x[key]['detection'] for x in r]):5.1f}%")
        print(f"{k:>9} | {pair('alone'):>22} | {pair('guarded'):>24} | {pair('alone_same_fr'):>20} | "
              + ", ".join(f"{100 * x['guarded']['guard_flags_good']:.1f}%" for x in r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
