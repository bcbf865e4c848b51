"""Classification metrics in numpy: the same numbers for a training run and an exported model."""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)), 1)
    return cm


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
    recalls = []
    for i, name in enumerate(labels):
        precision = tp[i] / predicted[i] if predicted[i] else 0.0
        recall = tp[i] / support[i] if support[i] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": float(precision), "recall": float(recall), "f1": float(f1),
                           "support": int(support[i])}
        if support[i]:
            recalls.append(recall)
    n = int(len(y_true))
    return {
        "n": n,
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "balanced_accuracy": float(np.mean(recalls)) if recalls else 0.0,
        "labels": labels,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }
