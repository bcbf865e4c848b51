"""Classification metrics in numpy: the same numbers for a training run and an exported model."""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)), 1)
    return cm


def balanced_accuracy(y_true, y_pred) -> float:
    """The mean recall over the classes present in y_true (0.0 for no images): fair when
    the classes hold different numbers of images."""
    y_true = np.asarray(y_true, dtype=int)
    y_pred = np.asarray(y_pred, dtype=int)
    recalls = [float(np.mean(y_pred[y_true == c] == c)) for c in np.unique(y_true)]
    return float(np.mean(recalls)) if recalls else 0.0


def classification_report(y_true, y_pred, labels) -> dict:
    """accuracy, balanced_accuracy (mean recall over classes present), per-class
    precision/recall/f1/support, confusion_matrix (rows: truth), n."""
    labels = list(labels)
    y_true = np.asarray(y_true, dtype=int)
    y_pred = np.asarray(y_pred, dtype=int)
    cm = confusion_matrix(y_true, y_pred, len(labels))
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diag(cm)
    per_class = {}
    for i, name in enumerate(labels):
        precision = tp[i] / predicted[i] if predicted[i] else 0.0
        recall = tp[i] / support[i] if support[i] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": float(precision), "recall": float(recall), "f1": float(f1),
                           "support": int(support[i])}
    n = int(len(y_true))
    return {
        "n": n,
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "balanced_accuracy": balanced_accuracy(y_true, y_pred),
        "labels": labels,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


ECE_BINS = 15


def expected_calibration_error(probs, y_true, bins: int = ECE_BINS) -> float:
    """Top-label expected calibration error: the gap between confidence and accuracy over
    equal-width confidence bins, weighted by the images in each (0: confidence means the
    probability of being right)."""
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(1)
    correct = probs.argmax(1) == np.asarray(y_true)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(conf[m].mean() - correct[m].mean())
    return float(ece)


def confidence_report(probs, y_true, reject_below: float | None = None) -> dict:
    """Expected calibration error and mean confidence; with a reject threshold, the share
    of images it would call unknown, how many of those were wrong, and the accuracy of the rest."""
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true)
    conf = probs.max(1)
    correct = probs.argmax(1) == y_true
    out = {"expected_calibration_error": round(expected_calibration_error(probs, y_true), 4),
           "mean_confidence": round(float(conf.mean()), 4) if len(conf) else None}
    if reject_below is not None and len(conf):
        unknown = conf < reject_below
        out.update(reject_below=reject_below, unknown_share=round(float(unknown.mean()), 4),
                   wrong_among_unknown=round(float(1 - correct[unknown].mean()), 4) if unknown.any() else None,
                   accuracy_of_the_rest=round(float(correct[~unknown].mean()), 4) if (~unknown).any() else None)
    return out


def auroc(y_true, score) -> float | None:
    """Area under the ROC curve (ties count half); None without both classes."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return None
    order = np.argsort(np.concatenate([neg, pos]), kind="mergesort")
    ranks = np.empty(len(order))
    allv = np.concatenate([neg, pos])[order]
    # average ranks over ties
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and allv[j + 1] == allv[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1
        i = j + 1
    r_pos = ranks[len(neg):].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))
