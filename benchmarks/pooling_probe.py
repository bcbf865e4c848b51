#!/usr/bin/env python
"""How should a linear head pool frozen features when a defect is a small part of the image?

    python benchmarks/pooling_probe.py elpv --size 300 --shots 10,20 --repeats 3
    python benchmarks/pooling_probe.py ../shared/datasets/neu-det --size 224 --shots 5,10,20 --repeats 3

Every image goes through frozen EfficientNet-Lite0 at --size px in its four quarter
turns; stages 4-7 (the middle stages `--taps mid` reads) are kept three ways: averaged
over the image, their maximum over the image, and as a grid of local feature vectors
(every stage pooled to the last tapped stage's grid). For the seeded draws of
benchmarks/fewshot.py (k images per class; the four turns of each train, the four turns
of each held-out image are averaged), balanced accuracy on every image not drawn, of:

- avg, max, avgmax: a logistic regression on standardised features (fit_probe);
- milF: a linear classifier of every grid cell, the image's score for a class being the
  mean of its top F share of cells (multiple-instance learning);
- pc: for each class, the distance of the image's cells to the nearest cell of that
  class's training images (mean of the 3 farthest), a logistic regression on those
  (PatchCore-like; training images scored leaving their own cells out).

The features are cached in --cache (an .npz per dataset and size), so other choices of
--methods reuse them.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import open_benchmark_data  # noqa: E402

from lineside.dataset import draw_per_class, load_arrays  # noqa: E402
from lineside.metrics import classification_report  # noqa: E402
from lineside.train.backbones import build_backbone  # noqa: E402
from lineside.train.model import Classifier  # noqa: E402
from lineside.train.heads import fit_probe  # noqa: E402


def extract(name, size, out):
    entry, backbone = build_backbone("efficientnet_lite0")
    spec = dataclasses.replace(entry.input_spec, height=size, width=size)
    images = open_benchmark_data(name)
    model = Classifier(backbone, entry.feature_dim, len(images.classes), spec).eval()
    x, images, _ = load_arrays(images, spec, progress=False)
    y = np.array(images.targets)
    taps = (4, 5, 6, 7)
    N = len(x); V = 4
    t0 = time.time()
    avg = []; mx = []; patches = []
    with torch.no_grad():
        for v in range(V):
            A, M, P = [], [], []
            for i in range(0, N, 32):
                b = torch.from_numpy(x[i:i+32]).permute(0, 3, 1, 2).float()
                b = torch.rot90(b, v, (2, 3))
                h = model.normalize(b)
                outs = []
                for j, st in enumerate(model.stages[:8]):
                    h = st(h)
                    if j in taps:
                        outs.append(h)
                g = outs[-1].shape[-1]
                A.append(torch.cat([o.mean((2, 3)) for o in outs], 1).numpy())
                M.append(torch.cat([o.amax((2, 3)) for o in outs], 1).numpy())
                P.append(torch.cat([F.adaptive_avg_pool2d(o, g) for o in outs], 1).half().numpy())
            avg.append(np.concatenate(A)); mx.append(np.concatenate(M)); patches.append(np.concatenate(P))
            print(f"view {v}: {time.time() - t0:.0f} s", flush=True)
    np.savez(out, y=y, avg=np.stack(avg), mx=np.stack(mx), patches=np.stack(patches), classes=np.array(images.classes))


def cached_features(data, size: int, cache_dir: Path):
    """The arrays extract() writes for `data` at `size` px, from the cache (made on first use)."""
    torch.set_num_threads(2)
    cache = cache_dir / f"pooling_{Path(str(data)).name}_{size}.npz"
    if not cache.exists():
        extract(data, size, cache)
    return np.load(cache)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="a dataset folder or manifest, or 'elpv'")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--shots", default="10,20")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default="avg,max,avgmax,mil0.1,mil0.03,pc")
    ap.add_argument("--cache", type=Path, default=Path("/tmp"))
    args = ap.parse_args(argv)
    d = cached_features(args.data, args.size, args.cache)
    y = d["y"]
    C = int(y.max()) + 1
    avg, mx, P = d["avg"], d["mx"], d["patches"]   # (V,N,D) (V,N,D) (V,N,D,g,g)
    V, N = avg.shape[:2]
    labels = [str(c) for c in range(C)]
    def bacc(yt, yp): return 100 * classification_report(yt, yp, labels)["balanced_accuracy"]

    def lin(F, dr, rest, l2=1e-3):
        xtr = F[:, dr].reshape(-1, F.shape[-1]); ytr = np.tile(y[dr], V)
        pr = fit_probe(xtr, ytr, C, l2, max_iter=500)
        return pr(F[:, rest].mean(0))

    def mil(dr, rest, topk=0.1, l2=1e-2, steps=300):
        g2 = P.shape[-1] * P.shape[-2]; D = P.shape[2]
        tr = torch.from_numpy(P[:, dr].astype(np.float32)).reshape(V * len(dr), D, g2).transpose(1, 2)  # (n, g2, D)
        mu = tr.reshape(-1, D).mean(0); sd = tr.reshape(-1, D).std(0) + 1e-6
        tr = (tr - mu) / sd
        yt = torch.from_numpy(np.tile(y[dr], V)).long()
        k = max(1, int(round(topk * g2)))
        head = torch.nn.Linear(D, C)
        opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=steps, line_search_fn="strong_wolfe")
        def logits(z):
            s = head(z)                       # (n, g2, C)
            return s.topk(k, 1).values.mean(1)
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(logits(tr), yt) + l2 * head.weight.pow(2).sum()
            loss.backward(); return loss
        opt.step(closure)
        with torch.no_grad():
            prob = torch.zeros(len(rest), C)
            for v in range(V):
                z = torch.from_numpy(P[v, rest].astype(np.float32)).reshape(len(rest), D, g2).transpose(1, 2)
                prob += torch.softmax(logits((z - mu) / sd), 1)
        return prob.argmax(1).numpy()

    def knn_scores(dr, targets_idx, exclude_self=False, top=3):
        """per class c: mean of the top `top` patch distances to class c's patch bank (view 0 of targets)."""
        g2 = P.shape[-1] * P.shape[-2]; D = P.shape[2]
        allp = torch.from_numpy(P[:, dr].astype(np.float32)).permute(1, 0, 3, 4, 2).reshape(len(dr), V * g2, D)
        mu = allp.reshape(-1, D).mean(0); sd = allp.reshape(-1, D).std(0) + 1e-6
        allp = (allp - mu) / sd
        out = np.zeros((len(targets_idx), C))
        for c in range(C):
            members = np.flatnonzero(y[dr] == c)
            bank = allp[members].reshape(-1, D)          # (m*V*g2, D)
            owner = np.repeat(dr[members], V * g2)
            bn = (bank ** 2).sum(1)
            for s in range(0, len(targets_idx), 64):
                idx = targets_idx[s:s + 64]
                z = (torch.from_numpy(P[0, idx].astype(np.float32)).reshape(len(idx), D, g2).transpose(1, 2) - mu) / sd
                d2 = (z ** 2).sum(2, keepdim=True) + bn - 2 * z @ bank.T    # (b, g2, M)
                if exclude_self:
                    for j, i in enumerate(idx):
                        d2[j][:, torch.from_numpy(owner == i)] = float("inf")
                m = d2.min(2).values.clamp_min(0).sqrt()          # (b, g2)
                out[s:s + 64, c] = m.topk(top, 1).values.mean(1).numpy()
        return out

    def patchcore(dr, rest):
        tr = knn_scores(dr, dr, exclude_self=True); te = knn_scores(dr, rest)
        pr = fit_probe(np.log(tr + 1e-3), y[dr], C, 1e-3, max_iter=500)
        return pr(np.log(te + 1e-3))
    shots = [int(s) for s in args.shots.split(",")]
    repeats, which = args.repeats, args.methods.split(",")
    for k in shots:
        res = {w: [] for w in which}
        for seed in range(repeats):
            dr, rest = draw_per_class(y, k, seed)
            for w in which:
                t0 = time.time()
                if w == "avg": p = lin(avg, dr, rest)
                elif w == "max": p = lin(mx, dr, rest)
                elif w == "avgmax": p = lin(np.concatenate([avg, mx], 2), dr, rest)
                elif w.startswith("mil"): p = mil(dr, rest, topk=float(w[3:] or 0.1))
                elif w == "pc": p = patchcore(dr, rest)
                res[w].append(bacc(y[rest], p))
                print(f"k={k} seed={seed} {w}: {res[w][-1]:.2f} ({time.time()-t0:.0f}s)", flush=True)
        for w in which:
            print(f"== k={k} {w}: {np.mean(res[w]):.2f} ± {np.std(res[w]):.2f}  {[round(a,2) for a in res[w]]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
