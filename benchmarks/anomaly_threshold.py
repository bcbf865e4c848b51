#!/usr/bin/env python
"""Does an anomaly model's threshold keep its false-reject promise on good parts it never
saw? Models are fitted on k good images drawn at random (seeded; the draws of
`lineside study sample-size --task anomaly`), and their out-of-fold scores and the scores
of the unseen good images kept; then several threshold rules are replayed on the same
scores, so that they differ only in the rule.

    python benchmarks/anomaly_threshold.py bottle       # ../shared/datasets/mvtec-bottle, all good bottles
    python benchmarks/anomaly_threshold.py elpv         # pip install elpv-dataset
    python benchmarks/anomaly_threshold.py neu          # ../shared/datasets/neu-det, each class as "good"

`bottle` pools train/good and test/good (229 good bottles) and also scores the 63
defective bottles (the detection rate each rule leaves); `elpv` scores 600 of the
unseen functional cells per draw and every defective cell; `neu` takes each of the six
steel-surface classes in turn as the good parts (300 images each; the other classes are
not scored).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lineside.train import anomaly as A  # noqa: E402
from lineside.train.anomaly import empirical_threshold, gumbel_threshold  # noqa: E402
from lineside.train.anomaly_run import read_anomaly_data  # noqa: E402
from lineside.train.device import pick_device  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
BOTTLE, NEU = SHARED / "mvtec-bottle", SHARED / "neu-det"
PLANS = {"bottle": ((8, 16, 32, 64), 3, None), "elpv": ((32, 100), 2, 600), "neu": ((8, 32, 64), 2, None)}


def with_empirical(rule):
    def both(oof, fr):
        t, e = rule(oof, fr), empirical_threshold(oof, fr)
        return max(t, e) if e is not None else t
    return both


def t_quantile(p: float, dof: float) -> float:
    """Student's t quantile (Cornish-Fisher expansion; close enough for a comparison)."""
    from statistics import NormalDist

    z, v = NormalDist().inv_cdf(p), float(dof)
    return (z + (z ** 3 + z) / (4 * v) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * v ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * v ** 3))


def lognormal(oof, fr):
    """The rule before: a normal fitted to the log-scores, its predictive quantile."""
    logs = np.log(oof)
    n = len(logs)
    return math.exp(logs.mean() + t_quantile(1 - fr, n - 1) * math.sqrt(1 + 1 / n) * logs.std(ddof=1))


def gumbel_raw(oof, fr):
    """The shipped rule on the scores themselves instead of their logarithms."""
    return math.log(gumbel_threshold(np.exp(oof), fr)[0])


RULES = {"shipped: Gumbel on log-scores": with_empirical(lambda o, fr: gumbel_threshold(o, fr)[0]),
         "normal on log-scores (before)": with_empirical(lognormal),
         "Gumbel on raw scores": with_empirical(gumbel_raw)}


def manifest(folder: Path, name: str, rows) -> Path:
    path = folder / f"{name}.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    return path


def datasets(name: str, folder: Path):
    """(label, data, good class) to fit on, in turn."""
    if name == "elpv":
        from bench_data import _elpv_folder

        return [("elpv", _elpv_folder(), "functional")]
    if name == "neu":
        return [(c.name, manifest(folder, c.name, [(str(p), "good") for p in sorted(c.iterdir())]), "good")
                for c in sorted(NEU.iterdir()) if c.is_dir()]
    rows = [(str(p), "good") for d in ("train/good", "test/good") for p in sorted((BOTTLE / d).glob("*.png"))]
    rows += [(str(p), "defect") for d in sorted((BOTTLE / "test").iterdir()) if d.name != "good"
             for p in sorted(d.glob("*.png"))]
    return [("bottle", manifest(folder, "bottle", rows), "good")]


def fit_draws(d, shots, repeats, limit, fr) -> list:
    """(k, out-of-fold scores, unseen good scores, other scores) of every fit."""
    fits = []
    for k in shots:
        for r in range(repeats):
            drawn = np.random.default_rng([r, k]).permutation(len(d.x_good))
            rest = drawn[k:] if limit is None else drawn[k:k + limit]
            fit = A.fit_anomaly(d.x_good[drawn[:k]], d.spec, false_reject=fr, seed=r, device=pick_device("cpu"))
            other = A.anomaly_scores(fit.model, d.x_other) if len(d.x_other) else None
            fits.append((k, np.asarray(fit.info["out_of_fold_scores"]), A.anomaly_scores(fit.model, d.x_good[rest]),
                         other))
            print(f"fitted {k} good images, draw {r}", file=sys.stderr, flush=True)
    return fits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", choices=sorted(PLANS))
    ap.add_argument("--false-reject", type=float, default=0.01)
    args = ap.parse_args()
    shots, repeats, limit = PLANS[args.data]
    fr = args.false_reject
    with tempfile.TemporaryDirectory() as tmp:
        for label, path, ok in datasets(args.data, Path(tmp)):
            fits = fit_draws(read_anomaly_data(path, ok, progress=False), shots, repeats, limit, fr)
            print(f"{label}: unseen good images flagged, {fr:.1%} promised (mean over draws, then each)"
                  + ("; defects caught" if fits[0][3] is not None else ""), flush=True)
            for name, rule in RULES.items():
                cells = []
                for k in shots:
                    mine = [(o, u, x) for kk, o, u, x in fits if kk == k]
                    rates = [100 * float(np.mean(u > rule(o, fr))) for o, u, _ in mine]
                    cell = f"{k}: {np.mean(rates):.1f}% ({', '.join(f'{x:.1f}' for x in rates)})"
                    if mine[0][2] is not None:
                        cell += f" caught {np.mean([100 * np.mean(x > rule(o, fr)) for o, _, x in mine]):.1f}%"
                    cells.append(cell)
                print(f"  {name}: " + "   ".join(cells), flush=True)


if __name__ == "__main__":
    main()
