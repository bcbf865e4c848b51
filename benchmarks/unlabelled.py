#!/usr/bin/env python
"""Does `lineside train --unlabelled` learn from the images nobody labelled?

The protocol: every class split in half (seeded by the draw); k labelled images per
class drawn from the first half, the rest of that half given without labels (a folder of
links), everything scored on the second half. Both runs use `lineside train`'s defaults
on the same draw: labelled images only, and with --unlabelled.

    python benchmarks/unlabelled.py elpv --shots 10,20 --repeats 3            # pip install elpv-dataset
    python benchmarks/unlabelled.py ../shared/datasets/neu-det --shots 5,10,20 --repeats 3
    python benchmarks/unlabelled.py elpv --shots 10 --majority functional     # unlabelled 90% good cells
    python benchmarks/unlabelled.py elpv --shots 10 --next 10                 # what to label next

--next N instead measures `lineside study next`: from the labelled-only run of each draw,
N more images per class are labelled (their true labels added to the training images),
once the N x classes images study next ranks first, once as many drawn at random from the
same unlabelled half; both runs are scored on the second half.

--majority CLASS keeps every unlabelled image of CLASS and only as many of the others as
make them 10% of the folder (a line's frames are nearly all good parts).
Prints balanced accuracy on the scored half (mean ± std over the draws), the difference,
the training times and what --unlabelled used in each draw. The run with --unlabelled
follows the recipe `auto` chose for the labelled-only run (pinned: auto's time budget is
a measurement of how busy the machine is).
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

from lineside.train.config import TrainConfig  # noqa: E402
from lineside.train.evaluate import evaluate_run  # noqa: E402
from lineside.train.run import train_run  # noqa: E402


def split(targets, k: int, seed: int, major: int | None = None):
    """(labelled, unlabelled, scored) indices of the protocol for one draw."""
    y = np.asarray(targets)
    rng = np.random.default_rng(seed)
    labelled, unlabelled, scored = [], [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        half = len(idx) // 2
        if half <= k:
            raise SystemExit(f"class {c}: {len(idx)} images, too few for {k} labelled from half of them")
        labelled += list(idx[:k])
        unlabelled += list(idx[k:half])
        scored += list(idx[half:])
    unlabelled = np.array(unlabelled)
    if major is not None:
        same, other = unlabelled[y[unlabelled] == major], unlabelled[y[unlabelled] != major]
        unlabelled = np.concatenate([same, rng.choice(other, min(len(other), round(len(same) / 9)), replace=False)])
    return np.array(labelled), np.sort(unlabelled), np.array(scored)


def link_folder(images, indices, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i in indices:
        p = Path(images.paths[i]).resolve()
        (folder / f"{i:06d}{p.suffix}").symlink_to(p)
    return folder


def same_recipe(cfg: TrainConfig, run: Path, metrics: dict) -> TrainConfig:
    """`cfg` with the recipe the run used (auto's choice pinned: with --time-budget it
    depends on how busy the machine was when it measured)."""
    from lineside.train.checkpoint import load_checkpoint

    taps = load_checkpoint(run).model.taps
    return cfg.override(strategy=metrics["strategy"], taps=",".join(map(str, taps)) if taps else "last")


def one_draw(images, k: int, seed: int, major, cfg: TrainConfig, tmp: Path) -> dict:
    labelled, unlabelled, scored = split(images.targets, k, seed, major)
    train_csv = images.write_manifest(tmp / f"train_{k}_{seed}.csv", labelled)
    test_csv = images.write_manifest(tmp / f"test_{k}_{seed}.csv", scored)
    folder = link_folder(images, unlabelled, tmp / f"unlabelled_{k}_{seed}")
    row = {"shots": k, "seed": seed, "unlabelled": int(len(unlabelled)), "scored": int(len(scored))}
    cfg = cfg.override(seed=seed)
    for name, extra in (("labelled_only", None), ("with_unlabelled", folder)):
        run = tmp / f"{name}_{k}_{seed}"
        t0 = time.perf_counter()
        metrics = train_run(train_csv, run, cfg, progress=False, unlabelled=extra)
        if extra is None:      # the same recipe for both: auto's time budget is a measurement of this machine
            cfg = same_recipe(cfg, run, metrics)
        row[f"{name}_train_s"] = round(time.perf_counter() - t0, 1)
        row[name] = evaluate_run(run, test_csv, progress=False)["balanced_accuracy"]
        row[f"{name}_strategy"] = metrics["strategy"]
        if extra is not None:
            row["steps"] = [{key: s.get(key) for key in ("method", "used", "why")}
                            for s in metrics["unlabelled"]["steps"]]
    return row


def next_draw(images, k: int, seed: int, count: int, cfg: TrainConfig, tmp: Path) -> dict:
    """--next: labelled-only, + the images study next picks, + as many random ones."""
    from lineside.dataset import load_arrays
    from lineside.train.checkpoint import load_checkpoint
    from lineside.train.next import rank_for_labelling

    labelled, unlabelled, scored = split(images.targets, k, seed)
    test_csv = images.write_manifest(tmp / f"test_{k}_{seed}.csv", scored)
    cfg = cfg.override(seed=seed)
    row = {"shots": k, "seed": seed, "added": count * len(images.classes)}

    def trained(name, indices, cfg):
        run = tmp / f"{name}_{k}_{seed}"
        t0 = time.perf_counter()
        metrics = train_run(images.write_manifest(tmp / f"{name}_{k}_{seed}.csv", indices), run, cfg, progress=False)
        row[f"{name}_train_s"] = round(time.perf_counter() - t0, 1)
        row[name] = evaluate_run(run, test_csv, progress=False)["balanced_accuracy"]
        return run, metrics

    run, metrics = trained("labelled_only", labelled, cfg)
    cfg = same_recipe(cfg, run, metrics)        # both added sets trained the same way
    loaded = load_checkpoint(run)
    x_unl, kept, _ = load_arrays(images.subset(unlabelled), loaded.spec, progress=False)
    x_lab = load_arrays(images.subset(labelled), loaded.spec, progress=False)[0]
    if len(kept) != len(unlabelled):
        raise SystemExit("an unreadable unlabelled image: the benchmark needs every image readable")
    t0 = time.perf_counter()
    ranked = rank_for_labelling(loaded.model, x_unl, x_lab, row["added"])
    row["rank_s"] = round(time.perf_counter() - t0, 1)
    picked = unlabelled[ranked["indices"]]
    row["picked_per_class"] = np.bincount(np.asarray(images.targets)[picked], minlength=len(images.classes)).tolist()
    random = np.random.default_rng(seed + 1000).choice(unlabelled, row["added"], replace=False)
    trained("study_next", np.concatenate([labelled, picked]), cfg)
    trained("random", np.concatenate([labelled, random]), cfg)
    return row


def print_next(rows, shots) -> None:
    print(f"\n{'per class':>9} | {'added':>5} | {'labelled only':>15} | {'+ study next':>15} | {'+ random':>15} | "
          f"next - random (per draw)")
    for k in shots:
        r = [x for x in rows if x["shots"] == k]
        a, n, rnd = (np.array([x[key] for x in r]) * 100 for key in ("labelled_only", "study_next", "random"))
        print(f"{k:>9} | {r[0]['added']:>5} | {a.mean():>6.2f}% ± {a.std():<5.2f} | {n.mean():>6.2f}% ± {n.std():<5.2f} | "
              f"{rnd.mean():>6.2f}% ± {rnd.std():<5.2f} | {(n - rnd).mean():+.2f} "
              f"({', '.join(f'{v:+.1f}' for v in n - rnd)})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="a dataset folder or manifest, or 'elpv'")
    ap.add_argument("--shots", default="10,20")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seeds", help="the draws to run, e.g. 1,2 (default: 0 to --repeats - 1)")
    ap.add_argument("--majority", metavar="CLASS", help="unlabelled images 90%% of this class")
    ap.add_argument("--next", type=int, metavar="N", help="measure study next: N more labelled images per class")
    ap.add_argument("--json", type=Path, help="also write every draw's results to this file")
    args = ap.parse_args(argv)

    images = open_benchmark_data(args.data)
    major = None
    if args.majority:
        if args.majority not in images.classes:
            raise SystemExit(f"--majority {args.majority}: not one of {', '.join(images.classes)}")
        major = images.classes.index(args.majority)
    shots = [int(s) for s in args.shots.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(range(args.repeats))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in shots:
            for seed in seeds:
                if args.next:
                    rows.append(next_draw(images, k, seed, args.next, TrainConfig(), Path(tmp)))
                else:
                    rows.append(one_draw(images, k, seed, major, TrainConfig(), Path(tmp)))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.next:
        print_next(rows, shots)
        return 0
    print(f"\n{'per class':>9} | {'unlabelled':>10} | {'labelled only':>15} | {'with --unlabelled':>17} | "
          f"{'difference':>16} | train s (only / with)")
    for k in shots:
        r = [x for x in rows if x["shots"] == k]
        a = np.array([x["labelled_only"] for x in r]) * 100
        b = np.array([x["with_unlabelled"] for x in r]) * 100
        d = b - a
        print(f"{k:>9} | {np.mean([x['unlabelled'] for x in r]):>10.0f} | {a.mean():>6.2f}% ± {a.std():<5.2f} | "
              f"{b.mean():>8.2f}% ± {b.std():<5.2f} | {d.mean():>+6.2f} ({', '.join(f'{v:+.1f}' for v in d)}) | "
              f"{np.mean([x['labelled_only_train_s'] for x in r]):.0f} / "
              f"{np.mean([x['with_unlabelled_train_s'] for x in r]):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
