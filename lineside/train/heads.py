"""Linear heads on pooled features: the fit every recipe's head goes through, and the
quick probe (with its cross-validation) that auto and the benchmarks compare features with."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lineside.metrics import balanced_accuracy

from .infer import FrozenForward
from .model import Classifier, pool_map
from .optim import without_dynamo

INFER_BATCH = 32


def pooled_stage_features(model: Classifier, x: np.ndarray, device, pool: str = "avg") -> list[np.ndarray]:
    """Every stage's output, pooled as a head on taps pools it (model.pool_map with `pool`), for
    images x (N, H, W, 3) uint8: one frozen pass in PyTorch (FrozenForward: batches of one
    shape, full float32 on CUDA, as the bank's and scoring's passes, so that on a GPU they
    share one set of kernels; 8 images a batch on the CPU: 0.93 s against 1.4-1.6 s in
    batches of 32 for 60 NEU images at 224 px, the same features)."""
    widths = []      # of each stage's pooled features, from the first batch

    def pooled(t):
        h, out = model.normalize(t), []
        for stage in model.stages:
            h = stage(h)
            out.append(pool_map(h.float(), pool))
        widths[:] = [o.shape[1] for o in out]
        return torch.cat(out, 1)

    feats = FrozenForward(model, pooled, x[:1], device, len(x), backend="torch").map(x).numpy()
    return np.split(feats, np.cumsum(widths)[:-1], axis=1)


def fit_linear_head(head: torch.nn.Linear, feats: torch.Tensor, target: torch.Tensor, l2: float,
                    standardise: bool, weight: torch.Tensor | None = None, max_iter: int = 300) -> None:
    """Multinomial logistic regression (L-BFGS, L2 on the weights) of `head` on pooled
    features, in place, from zero weights. With `standardise` the features are fitted on
    one scale and the scaling is folded back into the head, which stays a plain linear
    layer on the raw features."""
    if standardise:
        mu, sd = feats.mean(0), feats.std(0) + 1e-6
        feats = (feats - mu) / sd
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    without_dynamo()      # torch.optim without importing torch._dynamo (optim.py)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(feats), target, weight=weight) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    if standardise:
        with torch.no_grad():
            head.weight.div_(sd)
            head.bias.sub_(head.weight @ mu)


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, classes: int, l2: float = 1e-3, max_iter: int = 200):
    """A quick linear probe on standardised features (fit_linear_head). Returns
    predict(x) -> labels."""
    head = torch.nn.Linear(x_train.shape[1], classes)
    fit_linear_head(head, torch.from_numpy(x_train).float(), torch.from_numpy(y_train).long(), l2, True,
                    max_iter=max_iter)

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return head(torch.from_numpy(x).float()).argmax(1).numpy()

    return predict


def cross_validated_probe(feats: np.ndarray, y: np.ndarray, seed: int, folds: int = 5, repeats: int = 1) -> float:
    """Balanced accuracy of a linear probe (fit_probe) over stratified folds (at most
    `folds`, and no more than the smallest class has images), averaged over `repeats`
    different splits into folds: with a few images per class one split's score moves
    by points with the split alone."""
    from .calibrate import stratified_folds

    scores = []
    for r in range(repeats):
        fold, k = stratified_folds(y, [seed, r], folds, min_folds=2)
        pred = np.empty_like(y)
        for f in range(k):
            tr, te = fold != f, fold == f
            pred[te] = fit_probe(feats[tr], y[tr], int(y.max()) + 1)(feats[te])
        scores.append(balanced_accuracy(y, pred))
    return float(np.mean(scores))
