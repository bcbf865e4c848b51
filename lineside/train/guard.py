"""A classifier guarded by an anomaly model of its good class (`lineside train --guard`).

The classifier knows the defects it was shown; the guard, trained on the same run's good
images alone (train/anomaly.py, its threshold set at --false-reject from good images
scored by banks that did not hold them), knows what a good part looks like. One more
label, ANOMALOUS, takes the share of the classifier's good-class probability that the
guard says is not good:

    p'(good)      = p(good) * (1 - q)
    p'(anomalous) = p(good) * q             q = sigmoid((score - threshold) / (SHARPNESS * threshold))
    p'(defect)    = p(defect)

so a part is NG when either model says so, and the label says which: a defect class is
the classifier's verdict, ANOMALOUS the guard's (the classifier called it good). The whole
model is one graph with the classes and ANOMALOUS as its labels: it exports and runs like
any classifier. Measured on elpv with benchmarks/guard.py (docs/anomaly.md).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lineside.errors import LinesideError

from .anomaly import AnomalyModel

ANOMALOUS = "anomalous"
SHARPNESS = 0.02      # the step from good to anomalous spans about +-5% of the threshold


class GuardedClassifier(nn.Module):
    """(N, 3, H, W) float RGB in 0..255 -> log-probabilities (N, classes + 1), the last
    being ANOMALOUS."""

    task = "classify"
    views = None
    extra_labels = (ANOMALOUS,)

    def __init__(self, inner: nn.Module, guard: AnomalyModel, ok: int):
        super().__init__()
        self.inner = inner
        self.guard = guard
        self.ok = int(ok)

    @property
    def stages(self) -> nn.ModuleList:
        return self.inner.stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(self.inner(x).float(), 1)
        score = self.guard.score_and_map(x)[0]
        t = self.guard.threshold
        q = torch.sigmoid((score - t) / (SHARPNESS * t)).unsqueeze(1)
        good = p[:, self.ok:self.ok + 1]
        probs = torch.cat([p[:, :self.ok], good * (1 - q), p[:, self.ok + 1:], good * q], 1)
        return torch.log(probs.clamp_min(1e-12))


def combine(logits: np.ndarray, scores: np.ndarray, threshold: float, ok: int) -> np.ndarray:
    """GuardedClassifier's log-probabilities from the classifier's logits and the guard's
    raw scores (the same formula, in numpy: for out-of-fold answers)."""
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    q = 1.0 / (1.0 + np.exp(-(np.asarray(scores, np.float64) - threshold) / (SHARPNESS * threshold)))
    good = p[:, ok]
    probs = np.concatenate([p[:, :ok], (good * (1 - q))[:, None], p[:, ok + 1:], (good * q)[:, None]], 1)
    return np.log(np.maximum(probs, 1e-12)).astype(np.float32)


def add_guard(run, model, x_train: np.ndarray, y_train: np.ndarray, ok: int, false_reject: float,
              calibration: dict | None) -> tuple[GuardedClassifier, dict | None, dict]:
    """The guard trained on the training images of class `ok`, around `model`. Returns the
    guarded model, the calibration with its out-of-fold answers extended to ANOMALOUS (each
    good image scored by a bank without it; the other images are in no bank), and a report."""
    from .anomaly import anomaly_scores, fit_anomaly

    if ANOMALOUS in run.classes:
        raise LinesideError(f"--guard: a class is already called '{ANOMALOUS}' (the label the guard adds)")
    good = np.flatnonzero(y_train == ok)
    cfg = run.cfg
    fit = fit_anomaly(x_train[good], run.spec, cfg.backbone, cfg.weights if cfg.weights != "none" else "imagenet",
                      false_reject=false_reject, seed=cfg.seed, device=run.device, scorer="bank")
    guarded = GuardedClassifier(model, fit.model.to(run.device), ok).eval()
    scores = np.empty(len(y_train))
    scores[good] = fit.info["out_of_fold_scores"]
    others = np.flatnonzero(y_train != ok)
    scores[others] = anomaly_scores(fit.model, x_train[others], run.device) if len(others) else []
    threshold = float(fit.model.threshold)
    report = {"good_class": run.classes[ok], "good_images": int(len(good)), "threshold": threshold,
              "false_reject_target": false_reject, "false_reject_expected": fit.info["false_reject_expected"],
              "training_images_flagged": {run.classes[c]: int(np.sum(scores[y_train == c] > threshold))
                                          for c in range(len(run.classes))}}
    if calibration and calibration["source"].startswith("out-of-fold"):
        combined = combine(calibration["_logits"], scores, threshold, ok)
        after = np.exp(combined)
        before = np.concatenate([calibration["_probs"][0], np.zeros((len(after), 1))], 1)
        calibration = {**calibration, "_logits": combined, "_probs": (before, after)}
    return guarded, calibration, report


def describe(model: GuardedClassifier) -> dict:
    return {"ok": model.ok, **model.guard.shape(), "label": ANOMALOUS}


def rebuild(inner: nn.Module, entry, spec, guard: dict, classes: int) -> GuardedClassifier:
    """The empty model a checkpoint's `guard` entry describes (ValueError when malformed)."""
    from .good_parts import empty_scorer

    if not isinstance(guard, dict) or guard.get("label") != ANOMALOUS:
        raise ValueError("invalid 'guard' entry")
    return GuardedClassifier(inner, empty_scorer(entry, spec, guard, classes), guard["ok"])
