#!/usr/bin/env python
"""Which use of unlabelled images helps a linear head on frozen features? A probe on cached
features (stages 4-7 of frozen EfficientNet-Lite0, average and maximum: the head `auto`
picks with few images per class), the split-half protocol of benchmarks/unlabelled.py,
three draws, one view per image:

    python benchmarks/unlabelled_probe.py elpv --shots 10,20
    python benchmarks/unlabelled_probe.py ../shared/datasets/neu-det --shots 5,10,20

lo     labelled images only (standardised logistic regression)
stdu   the same, standardised with the unlabelled images' statistics too
st     self-training: balanced pseudo-labels of the surest unlabelled images, three rounds
lp     label spreading over a k-nearest-neighbour graph of labelled and unlabelled images,
       then the head on the labelled images and the spread labels
lpall  label spreading, every unlabelled image weighed by its certainty

Features are cached in --cache (an .npz per dataset).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import open_benchmark_data  # noqa: E402

from lineside.dataset import load_arrays  # noqa: E402
from lineside.metrics import balanced_accuracy  # noqa: E402
from lineside.train.backbones import build_backbone  # noqa: E402
from lineside.train.heads import fit_linear_head, pooled_stage_features  # noqa: E402
from lineside.train.model import TAPS_POOL, Classifier  # noqa: E402
from lineside.train.optim import without_dynamo  # noqa: E402

X = y = C = None  # set by main


def features(name: str, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    path = cache / f"unlabelled_probe_{Path(str(name)).name}.npz"
    if not path.exists():
        entry, backbone = build_backbone("efficientnet_lite0")
        images = open_benchmark_data(name)
        model = Classifier(backbone, entry.feature_dim, len(images.classes), entry.input_spec).eval()
        x, images, _ = load_arrays(images, entry.input_spec, progress=False)
        f = pooled_stage_features(model, x, torch.device("cpu"), pool=TAPS_POOL)
        np.savez(path, y=np.array(images.targets), x=np.concatenate([f[i] for i in (4, 5, 6, 7)], 1))
    d = np.load(path)
    return d["x"].astype(np.float32), d["y"]


def fit(Xtr, ytr, mu, sd, w=None, l2=1e-3):
    head = torch.nn.Linear(Xtr.shape[1], C)
    Z = torch.from_numpy((Xtr - mu) / sd).float()
    # fit_linear_head standardises itself; we pass pre-standardised with standardise False
    cw = torch.from_numpy(len(ytr) / (C * np.bincount(ytr, minlength=C).clip(1))).float()
    if w is None:
        fit_linear_head(head, Z, torch.from_numpy(ytr).long(), l2, False, cw, max_iter=500)
    else:  # weighted rows
        without_dynamo()
        torch.nn.init.zeros_(head.weight); torch.nn.init.zeros_(head.bias)
        opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=500, history_size=20, line_search_fn="strong_wolfe")
        wt = torch.from_numpy(w).float(); yt = torch.from_numpy(ytr).long()
        rw = wt * cw[yt]
        def closure():
            opt.zero_grad()
            loss = (torch.nn.functional.cross_entropy(head(Z), yt, reduction="none") * rw).sum() / rw.sum() + l2 * head.weight.pow(2).sum()
            loss.backward(); return loss
        opt.step(closure)
    def prob(Xq):
        with torch.no_grad():
            return torch.softmax(head(torch.from_numpy((Xq - mu) / sd).float()), 1).numpy()
    return prob

def split(seed, k, major=None):
    rng = np.random.default_rng(seed)
    L, U, T = [], [], []
    for c in range(C):
        idx = rng.permutation(np.flatnonzero(y == c)); h = len(idx) // 2
        first, T_c = idx[:h], idx[h:]
        L += list(first[:k]); U += list(first[k:]); T += list(T_c)
    U = np.array(U)
    if major is not None:
        um = U[y[U] == major]; uo = U[y[U] != major]
        n_o = int(round(len(um) / 9))
        U = np.concatenate([um, rng.choice(uo, min(n_o, len(uo)), replace=False)])
    return np.array(L), U, np.array(T)

def stats(A):
    return A.mean(0), A.std(0) + 1e-6

def m_lo(L, U):
    mu, sd = stats(X[L]); return fit(X[L], y[L], mu, sd)

def m_stdu(L, U):
    mu, sd = stats(X[np.concatenate([L, U])]); return fit(X[L], y[L], mu, sd)

def pick(P, yl, per_class_cap, thr):
    """class-balanced confident pseudo labels: for each class, U rows predicted as it with prob>=thr, top cap"""
    lab = P.argmax(1); conf = P.max(1); sel = []
    for c in range(C):
        r = np.flatnonzero((lab == c) & (conf >= thr))
        r = r[np.argsort(-conf[r])][:per_class_cap]
        sel.append(r)
    n = min(len(s) for s in sel)  # balanced
    sel = np.concatenate([s[:max(n, 0)] for s in sel])
    return sel, lab[sel]

def m_st(L, U, rounds=3, mult=5, thr=0.0, std="LU"):
    mu, sd = stats(X[np.concatenate([L, U])] if std == "LU" else X[L])
    k = np.bincount(y[L]).min()
    prob = fit(X[L], y[L], mu, sd)
    for r in range(rounds):
        P = prob(X[U])
        sel, lab = pick(P, y[L], mult * k * (r + 1), thr)
        prob = fit(np.concatenate([X[L], X[U][sel]]), np.concatenate([y[L], lab]), mu, sd)
    return prob

def spread(L, U, knn=10, alpha=0.99, dims=64):
    A = np.concatenate([L, U]); mu, sd = stats(X[A]); Z = (X[A] - mu) / sd
    # PCA
    Zc = Z - Z.mean(0); Uu, S, Vt = np.linalg.svd(Zc, full_matrices=False)
    Z = Zc @ Vt[:dims].T; Z /= np.linalg.norm(Z, axis=1, keepdims=True) + 1e-9
    S_ = Z @ Z.T; np.fill_diagonal(S_, -1)
    nn = np.argsort(-S_, 1)[:, :knn]
    W = np.zeros_like(S_); rows = np.arange(len(A))[:, None]
    W[rows, nn] = np.maximum(S_[rows, nn], 0) ** 3
    W = W + W.T
    Dg = W.sum(1) + 1e-9; Wn = W / np.sqrt(Dg[:, None] * Dg[None, :])
    Y0 = np.zeros((len(A), C)); Y0[np.arange(len(L)), y[L]] = 1 / np.bincount(y[L])[y[L]]
    F = Y0.copy()
    for _ in range(30):
        F = alpha * Wn @ F + (1 - alpha) * Y0
    F = F[len(L):]; F = F / (F.sum(1, keepdims=True) + 1e-12)
    return F, mu, sd

def m_lp(L, U, mult=5):
    F, mu, sd = spread(L, U)
    k = np.bincount(y[L]).min()
    sel, lab = pick(F, y[L], mult * k, 0.0)
    return fit(np.concatenate([X[L], X[U][sel]]), np.concatenate([y[L], lab]), mu, sd)

def m_lpall(L, U):
    F, mu, sd = spread(L, U)
    w = F.max(1); w = (w - 1 / C) / (1 - 1 / C)   # certainty weight
    lab = F.argmax(1)
    return fit(np.concatenate([X[L], X[U]]), np.concatenate([y[L], lab]), mu, sd,
               w=np.concatenate([np.ones(len(L)), w]))


METHODS = {"lo": m_lo, "stdu": m_stdu, "st": m_st, "lp": m_lp, "lpall": m_lpall}


def main(argv=None) -> int:
    global X, y, C
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--shots", default="10,20")
    ap.add_argument("--methods", default="lo,stdu,st,lp,lpall")
    ap.add_argument("--majority", type=int, default=None, help="unlabelled 90%% this class index")
    ap.add_argument("--cache", type=Path, default=Path("/tmp"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    X, y = features(args.data, args.cache)
    C = int(y.max()) + 1
    want = args.methods.split(",")
    for k in [int(s) for s in args.shots.split(",")]:
        res = {m: [] for m in want}
        tt = {m: 0.0 for m in want}
        for seed in range(3):
            L, U, T = split(seed, k, args.majority)
            for m in want:
                t0 = time.time()
                p = METHODS[m](L, U)
                tt[m] += time.time() - t0
                res[m].append(100 * balanced_accuracy(y[T], p(X[T]).argmax(1)))
        print(f"k={k} unlabelled={len(U)}  " + "  ".join(
            f"{m}: {np.mean(v):.2f} ± {np.std(v):.2f} ({' '.join(f'{a:.1f}' for a in v)})" for m, v in res.items()),
            flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
