"""Confidence that means a probability: one temperature for the logits, fitted on
predictions for images the model being judged did not train on, folded into the head;
and the default --reject-below chosen from the same predictions.

Where they come from: the run's validation images when it has a validation split, else
out-of-fold predictions of the training images (the run's recipe trained again on all
folds but one, k times, each fold predicted by the model that did not see it). With a
few dozen images no other honest source exists: the final model is sure of its own
training images.

The temperature T minimises the negative log-likelihood of softmax(z / T) (Guo et al.,
2017, "On calibration of modern neural networks"), raised if needed so that the mean
confidence does not exceed the Laplace-smoothed accuracy (see cap_temperature); it
changes no label. The expected
calibration error (ECE: the mean gap between confidence and accuracy over 15 equal-width
confidence bins, weighted by the images in each) is reported before and after.
--reject-below defaults to the calibrated confidence below which KEEP_CORRECT of the
correct out-of-fold answers lie above: 1% of the right answers become `unknown`, and
what falls below it is mostly what the model got wrong.
"""

from __future__ import annotations

import textwrap

import numpy as np

from lineside.metrics import ECE_BINS, expected_calibration_error
KEEP_CORRECT = 0.99
MAX_FOLDS = 5


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def nll(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    z = logits / t
    z = z - z.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T in [0.05, 20] that minimises the NLL of softmax(logits / T): a grid in log T,
    then two finer grids around the best point (the NLL is smooth and unimodal in T)."""
    logits = np.asarray(logits, np.float64)
    y = np.asarray(y, int)
    lo, hi = np.log(0.05), np.log(20.0)
    best = 0.0
    for _ in range(3):
        grid = np.linspace(lo, hi, 41)
        losses = [nll(logits, y, float(np.exp(g))) for g in grid]
        i = int(np.argmin(losses))
        best = grid[i]
        step = grid[1] - grid[0]
        lo, hi = best - step, best + step
    return float(np.exp(best))


def mean_confidence(logits: np.ndarray, t: float) -> float:
    return float(softmax(logits / t).max(1).mean())


def confidence_ceiling(logits: np.ndarray, y: np.ndarray) -> float:
    """The accuracy of `logits` on labels y with one right and one wrong answer added
    ((correct + 1) / (n + 2), Laplace): the highest mean confidence they can vouch for."""
    return (float(np.sum(np.asarray(logits).argmax(1) == np.asarray(y))) + 1.0) / (len(y) + 2.0)


def cap_temperature(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    """The NLL's T, raised where needed so that the mean confidence is no higher than the
    accuracy with one right and one wrong answer added ((correct + 1) / (n + 2), Laplace).
    When every held-out answer is right, the NLL keeps falling as T goes to 0 (every
    confidence to 1): that says nothing about the next image, and would put the
    reject threshold at 1.0."""
    ceiling = confidence_ceiling(logits, y)
    if mean_confidence(logits, t) <= ceiling:
        return t
    lo, hi = t, t
    while mean_confidence(logits, hi) > ceiling and hi < 1e4:
        hi *= 2.0
    for _ in range(60):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if mean_confidence(logits, mid) > ceiling else (lo, mid)
    return float(hi)


def reject_threshold(probs: np.ndarray, y: np.ndarray, keep: float = KEEP_CORRECT) -> float | None:
    """The confidence below which (1 - keep) of the correct answers lie; None when none is correct."""
    conf = probs.max(1)
    correct = probs.argmax(1) == np.asarray(y)
    if not correct.any():
        return None
    return float(np.quantile(conf[correct], 1.0 - keep, method="lower"))


def calibration_report(logits: np.ndarray, y: np.ndarray, source: str) -> dict:
    """Temperature, ECE before and after, and the default reject threshold, from logits of
    images the judged model did not train on."""
    logits = np.asarray(logits, np.float64)
    y = np.asarray(y, int)
    t_nll = fit_temperature(logits, y)
    t = cap_temperature(logits, y, t_nll)
    before, after = softmax(logits), softmax(logits / t)
    threshold = reject_threshold(after, y)
    return {
        "source": source, "images": int(len(y)), "right": int(np.sum(logits.argmax(1) == y)),
        "temperature": round(t, 4),
        # set when cap_temperature raised T: the mean confidence these answers can vouch for
        "confidence_ceiling": round(confidence_ceiling(logits, y), 4) if t > t_nll else None,
        "ece_before": round(expected_calibration_error(before, y), 4),
        "ece_after": round(expected_calibration_error(after, y), 4),
        "nll_before": round(nll(logits, y, 1.0), 4), "nll_after": round(nll(logits, y, t), 4),
        "reject_below": round(threshold, 4) if threshold is not None else None,
        "reject_rule": f"the calibrated confidence that keeps {KEEP_CORRECT:.0%} of the correct answers above it",
        "rejected_correct": round(float(np.mean(after.max(1)[after.argmax(1) == y] < threshold)), 4)
        if threshold is not None else None,
        "rejected_wrong": round(float(np.mean(after.max(1)[after.argmax(1) != y] < threshold)), 4)
        if threshold is not None and np.any(after.argmax(1) != y) else None,
        "_probs": (before, after), "_y": y, "_logits": logits / t,
    }


def stratified_folds(y: np.ndarray, seed, max_folds: int = MAX_FOLDS, min_folds: int = 0) -> tuple[np.ndarray, int]:
    """A fold number for every image, each class spread over the folds; the number of folds
    (at most max_folds, at most the smallest class's count unless min_folds asks for more;
    0 when that leaves fewer than 2). `seed`: anything numpy's default_rng takes."""
    y = np.asarray(y)
    counts = np.bincount(y)
    k = int(max(min_folds, min(max_folds, counts[counts > 0].min())))
    fold = np.zeros(len(y), int)
    if k < 2:
        return fold, 0
    rng = np.random.default_rng(seed)
    for c in np.flatnonzero(counts):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold[idx] = np.arange(len(idx)) % k
    return fold, k


def reliability_diagram(probs_before: np.ndarray, probs_after: np.ndarray, y: np.ndarray, path, title: str,
                        bins: int = ECE_BINS) -> None:
    """Accuracy against confidence per bin, before and after the temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect")
    edges = np.linspace(0, 1, bins + 1)
    for probs, name, colour in ((probs_before, "before", "tab:red"), (probs_after, "after", "tab:blue")):
        conf = probs.max(1)
        correct = probs.argmax(1) == y
        which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
        xs, ys, ns = [], [], []
        for b in range(bins):
            m = which == b
            if m.any():
                xs.append(conf[m].mean())
                ys.append(correct[m].mean())
                ns.append(m.sum())
        ece = expected_calibration_error(probs, y, bins)
        ax.plot(xs, ys, marker="o", color=colour, label=f"{name} (ECE {ece:.3f})")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(textwrap.fill(title, 64), fontsize=9)     # a long title would run off the figure
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
