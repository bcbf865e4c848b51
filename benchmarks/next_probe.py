#!/usr/bin/env python
"""Which images to label next? Strategies for `lineside study next` compared on cached
features (stages 4-7 of frozen EfficientNet-Lite0, average and maximum, one view; the
linear head `auto` picks with few images per class), with the split-half protocol of
benchmarks/unlabelled.py: k labelled images per class from the first half, 10 more per
class picked from the rest of that half by each strategy and labelled, the head fitted
again, everything scored on the second half. Many draws, since the picks are cheap here.

    python benchmarks/next_probe.py elpv --shots 10 --draws 10
    python benchmarks/next_probe.py ../shared/datasets/neu-det --shots 5 --draws 10

random        drawn at random from the unlabelled half
shipped       what study next does: the least certain (5x as many as asked for), spread
              over the feature space (lineside.train.next)
margin        the smallest margins alone
balanced      the smallest margins, the same number per predicted class
typiclust     k-means into (labelled + asked for) clusters; from each of the largest
              clusters holding no labelled image, its most typical member (TypiClust)
margin+typi   typiclust among the least certain candidates only

Features are cached in --cache, shared with benchmarks/unlabelled_probe.py.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import unlabelled_probe as probe  # noqa: E402

from lineside.metrics import balanced_accuracy  # noqa: E402
from lineside.train.next import CANDIDATES, margins, spread_picks  # noqa: E402


def standardise(a):
    return (a - a.mean(0)) / (a.std(0) + 1e-6)


def principal(z, dims=32):
    z = z - z.mean(0)
    return z @ np.linalg.svd(z, full_matrices=False)[2][:dims].T


def kmeans(z, n, rng, rounds=30):
    centres = z[rng.choice(len(z), n, replace=False)]
    for _ in range(rounds):
        nearest = ((z[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        for j in range(n):
            if (nearest == j).any():
                centres[j] = z[nearest == j].mean(0)
    return nearest


def typiclust(X, L, U, p, budget, rng, pool=None):
    z = principal(standardise(np.concatenate([X[U], X[L]])))
    cluster = kmeans(z, len(L) + budget, rng)
    cu, covered, picks = cluster[:len(U)], set(cluster[len(U):].tolist()), []
    for j in np.argsort(-np.bincount(cu, minlength=len(L) + budget)):
        if len(picks) >= budget:
            break
        members = np.flatnonzero(cu == j)
        if pool is not None:
            members = np.intersect1d(members, pool)
        if j in covered or not len(members):
            continue
        d = np.sqrt(((z[members][:, None] - z[members][None]) ** 2).sum(-1))
        near = min(20, len(members) - 1)
        typical = 1 / (np.sort(d, 1)[:, 1:near + 1].mean(1) + 1e-9) if near else np.ones(1)
        picks.append(int(members[typical.argmax()]))
        covered.add(j)
    rest = [int(i) for i in np.argsort(margins(p), kind="stable") if i not in picks]
    return np.array((picks + rest)[:budget])


def strategies(X, C):
    def shipped(L, U, p, budget, rng):
        z = standardise(np.concatenate([X[U], X[L]]))
        m = margins(p)
        cand = np.argsort(m, kind="stable")[:budget * CANDIDATES]
        return cand[spread_picks(z[:len(U)][cand], 1 - m[cand], z[len(U):], budget)]

    def balanced(L, U, p, budget, rng):
        m, pred = margins(p), p.argmax(1)
        out = []
        for c in range(C):
            idx = np.flatnonzero(pred == c)
            out += list(idx[np.argsort(m[idx], kind="stable")][:budget // C])
        rest = [i for i in np.argsort(m, kind="stable") if i not in set(out)]
        return np.array((out + rest)[:budget])

    return {"random": lambda L, U, p, b, rng: rng.choice(len(U), b, replace=False),
            "shipped": shipped,
            "margin": lambda L, U, p, b, rng: np.argsort(margins(p), kind="stable")[:b],
            "balanced": balanced,
            "typiclust": lambda L, U, p, b, rng: typiclust(X, L, U, p, b, rng),
            "margin+typi": lambda L, U, p, b, rng: typiclust(X, L, U, p, b, rng,
                                                             np.argsort(margins(p), kind="stable")[:b * CANDIDATES])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--more", type=int, default=10, help="images per class to label next")
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--cache", type=Path, default=Path("/tmp"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    X, y = probe.features(args.data, args.cache)
    probe.X, probe.y, probe.C = X, y, int(y.max()) + 1
    budget = args.more * probe.C
    ways = strategies(X, probe.C)
    res = {name: [] for name in ["labelled only", *ways]}
    for seed in range(args.draws):
        L, U, T = probe.split(seed, args.shots)
        head = probe.m_lo(L, U)
        p = head(X[U])
        res["labelled only"].append(100 * balanced_accuracy(y[T], head(X[T]).argmax(1)))
        for name, pick in ways.items():
            chosen = U[np.asarray(pick(L, U, p, budget, np.random.default_rng(seed + 100)))]
            assert len(set(chosen.tolist())) == budget, name
            res[name].append(100 * balanced_accuracy(y[T], probe.m_lo(np.concatenate([L, chosen]), U)(X[T]).argmax(1)))
        print(f"draw {seed}: " + "  ".join(f"{n} {v[-1]:.1f}" for n, v in res.items()), file=sys.stderr, flush=True)
    print(f"{args.data}: {args.shots} labelled per class, {args.more} more per class, {args.draws} draws")
    for name, v in res.items():
        d = np.array(v) - np.array(res["random"])
        print(f"  {name:14s} {np.mean(v):6.2f} ± {np.std(v):.2f}   against random {d.mean():+.2f} "
              f"(better in {int((d > 0).sum())} of {len(d)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
