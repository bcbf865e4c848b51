#!/usr/bin/env python
"""Does an anomaly model's threshold keep its false-reject promise on good parts it never
saw? Models are fitted on k good images drawn at random (seeded; the draws of
`lineside study sample-size --task anomaly`), and their out-of-fold scores and the scores
of the unseen good images kept; then several threshold rules are replayed on the same
scores, so that they differ only in the rule.

    python benchmarks/anomaly_threshold.py bottle       # ../shared/datasets/mvtec-bottle, all good bottles
    python benchmarks/anomaly_threshold.py elpv         # pip install elpv-dataset

`bottle` pools train/good and test/good (229 good bottles); `elpv` scores 600 of the
unseen functional cells per draw.
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
from lineside.train.anomaly import empirical_threshold, lognormal_threshold, t_quantile  # noqa: E402
from lineside.train.anomaly_run import read_anomaly_data  # noqa: E402
from lineside.train.device import pick_device  # noqa: E402

BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mvtec-bottle"
PLANS = {"bottle": ((8, 16, 32, 64), 3, None), "elpv": ((32, 100), 2, 600)}


def shipped(oof, fr):
    t, e = lognormal_threshold(oof, fr)[0], empirical_threshold(oof, fr)
    return max(t, e) if e is not None else t


def tail_sigma(q: float, z: float):
    """The log-normal rule with sigma at least the one the upper quantile q implies."""
    def rule(oof, fr):
        logs = np.log(oof)
        n = len(logs)
        sigma = max(logs.std(ddof=1), (np.quantile(logs, q) - np.quantile(logs, 0.5)) / z)
        t = math.exp(np.median(logs) + t_quantile(1 - fr, n - 1) * math.sqrt(1 + 1 / n) * sigma)
        e = empirical_threshold(oof, fr)
        return max(t, e) if e is not None else t
    return rule


RULES = {"shipped": shipped, "sigma from q90": tail_sigma(0.9, 1.2816), "sigma from q75": tail_sigma(0.75, 0.6745),
         "at least the largest out-of-fold score": lambda oof, fr: max(shipped(oof, fr), float(oof.max()))}


def data_path(name: str, folder: Path) -> tuple[Path, str | None]:
    if name == "elpv":
        from bench_data import _elpv_folder

        return _elpv_folder(), "functional"
    rows = [(str(p), "good") for d in ("train/good", "test/good") for p in sorted((BOTTLE / d).glob("*.png"))]
    manifest = folder / "bottle.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    return manifest, "good"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", choices=sorted(PLANS))
    ap.add_argument("--false-reject", type=float, default=0.01)
    args = ap.parse_args()
    shots, repeats, limit = PLANS[args.data]
    with tempfile.TemporaryDirectory() as tmp:
        path, ok = data_path(args.data, Path(tmp))
        d = read_anomaly_data(path, ok)
    spec, x_good = d.spec, d.x_good
    fits = []
    for k in shots:
        for r in range(repeats):
            drawn = np.random.default_rng([r, k]).permutation(len(x_good))
            rest = drawn[k:] if limit is None else drawn[k:k + limit]
            fit = A.fit_anomaly(x_good[drawn[:k]], spec, false_reject=args.false_reject, seed=r,
                                device=pick_device("cpu"))
            fits.append((k, np.asarray(fit.info["out_of_fold_scores"]), A.anomaly_scores(fit.model, x_good[rest])))
            print(f"fitted {k} good images, draw {r}", file=sys.stderr, flush=True)
    print(f"{args.data}: unseen good images flagged, {args.false_reject:.1%} promised (mean over draws, then each)")
    for name, rule in RULES.items():
        cells = []
        for k in shots:
            rates = [100 * float(np.mean(u > rule(o, args.false_reject))) for kk, o, u in fits if kk == k]
            cells.append(f"{k}: {np.mean(rates):.1f}% ({', '.join(f'{x:.1f}' for x in rates)})")
        print(f"  {name}: " + "   ".join(cells))


if __name__ == "__main__":
    main()
