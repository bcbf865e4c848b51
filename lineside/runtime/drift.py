"""Drift alarms: is the line still showing the model what it was trained on?

Export stores a reference in bundle.json (`drift_reference`, so the manifest and its
signature cover it): for each statistic, ten bins with equal shares of the training
images, from up to REFERENCE_IMAGES of them:

- brightness: the mean grey level (0..255) of the model's input (after ROI and resize);
- contrast: its standard deviation;
- confidence: the top probability, only where predictions on images the model never
  trained on are at hand (a run's out-of-fold predictions): on its own training images a
  model is surer than on the line, and that difference would read as drift;
- the unknown rate: the share of those predictions below the bundle's reject threshold.
  A window whose unknown share is more than 5 points and 3 standard errors above it,
  twice in a row, is a drift too (unknown_limit). The NG rate is not watched: it
  follows the line's own defect rate, which no training set estimates.

On the box a rolling window of the last `window` frames (default 300: 10 s at 30 FPS)
is compared with the reference every `every` frames, two ways: the population stability
index, PSI = sum over bins of (p - q) ln(p / q), and the shift of the window's mean in
training standard deviations, z = |mean - mean_train| / sd_train. A drift is both at
once, twice in a row: PSI >= 0.25 and z >= 0.5. It raises a `drift` event (log, MQTT,
OPC UA, the page; `lineside_drift_psi` and `lineside_drift_alarm` in /metrics) naming
the statistic, its PSI, z and the window's mean against training's; z below 0.25
clears it (`drift_cleared`). A drift never stops the line. A lasting change of at least
BOUND_SD (0.75) training SD is reported within one window and two evaluations after it
starts (at the defaults 360 frames, 12 s at 30 FPS); a smaller one usually is, not always,
as a window of 100 parts knows its mean to about 0.1 SD (benchmarks/drift.py measures
both on real images).

Why both: with a few-shot reference PSI alone is noisy (measured on 60 synthetic
training images and windows of 300 frames, each part held 3 frames, with no drift:
PSI's 99th percentile 0.21, its maximum over 300 windows 0.38), while the mean moved
at most 0.35 training SD; a gamma of 0.7 on the same images moved it 0.71 SD, with PSI
0.63. The window should span many parts (50 or more): a window of one part held long
in front of the camera measures that part, not the line.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from lineside.errors import LinesideError

REFERENCE_IMAGES = 300
BINS = 10
STATS = ("brightness", "contrast", "confidence")
ALARM_PSI = 0.25
ALARM_Z = 0.5                # the window's mean, in training standard deviations, away from training's
CLEAR_Z = 0.25
BOUND_SD = 0.75              # a lasting shift this large is reported within one window and two evaluations
SD_FLOOR = {"brightness": 2.0, "contrast": 1.0, "confidence": 0.02}   # training sets of one look
DEFAULT_WINDOW = 300
DEFAULT_EVERY = 30
FLOOR = 1e-3                 # a share never taken as 0 (ln of it)


def image_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(brightness, contrast) of (N, H, W, 3) uint8 images, as the loop measures each frame:
    the mean over channels of each channel's mean and standard deviation."""
    x = images.reshape(len(images), -1, images.shape[-1]).astype(np.float64)
    return x.mean(axis=1).mean(axis=1), x.std(axis=1).mean(axis=1)


def reference_of(values, source: str) -> dict:
    """Equal-share bins of `values`: their inner edges, the shares, and the mean."""
    v = np.asarray(values, np.float64)
    edges = np.unique(np.quantile(v, np.linspace(0, 1, BINS + 1)[1:-1]))
    shares = _shares(v, edges)
    return {"edges": [round(float(e), 4) for e in edges], "shares": [round(float(s), 5) for s in shares],
            "mean": round(float(v.mean()), 4), "sd": round(float(v.std()), 4), "n": int(len(v)), "source": source}


def _shares(values: np.ndarray, edges) -> np.ndarray:
    counts = np.bincount(np.searchsorted(np.asarray(edges), values, side="right"), minlength=len(edges) + 1)
    return counts / max(1, len(values))


def build_reference(images: np.ndarray, confidences=None, source: str = "", reject_below: float | None = None) -> dict:
    brightness, contrast = image_stats(images)
    stats = {"brightness": reference_of(brightness, source), "contrast": reference_of(contrast, source)}
    doc = {"schema": 1, "stats": stats}
    if confidences is not None and len(confidences):
        stats["confidence"] = reference_of(confidences, "out-of-fold predictions")
        if reject_below is not None:      # the share of unknowns the line should see
            doc["unknown_rate"] = {"expected": round(float(np.mean(np.asarray(confidences) < reject_below)), 5),
                                   "reject_below": float(reject_below), "n": int(len(confidences))}
    return doc


def check_reference(doc, where: str) -> dict | None:
    """A bundle's drift_reference, validated (None when it has none)."""
    if doc is None:
        return None
    try:
        stats = doc["stats"]
        assert doc.get("schema") == 1 and isinstance(stats, dict) and stats
        out = {}
        for name, ref in stats.items():
            assert name in STATS
            edges = [float(e) for e in ref["edges"]]
            shares = [float(s) for s in ref["shares"]]
            assert len(shares) == len(edges) + 1 <= 4 * BINS and edges == sorted(edges)
            assert all(0 <= s <= 1 for s in shares) and abs(sum(shares) - 1) < 1e-2
            mean, sd = float(ref["mean"]), float(ref["sd"])
            assert all(math.isfinite(x) for x in (*edges, mean, sd)) and sd >= 0
            out[name] = {"edges": edges, "shares": np.asarray(shares), "mean": mean,
                         "sd": max(sd, SD_FLOOR[name])}
        rate = doc.get("unknown_rate")
        if rate is not None:
            expected = float(rate["expected"])
            assert 0.0 <= expected <= 1.0 and int(rate["n"]) > 0
            out["unknown_rate"] = {"expected": expected, "n": int(rate["n"])}
        return out
    except (AssertionError, KeyError, TypeError, ValueError, AttributeError):
        raise LinesideError(f"{where}: drift_reference is malformed") from None


def psi(window_shares: np.ndarray, reference_shares: np.ndarray) -> float:
    p = np.maximum(window_shares, FLOOR)
    q = np.maximum(reference_shares, FLOOR)
    return float(np.sum((p - q) * np.log(p / q)))


class DriftMonitor:
    """Fed one frame at a time by the loop (add: O(1)); every `every` frames, once the
    window is full, each statistic's PSI against the reference (about 0.1 ms)."""

    def __init__(self, reference: dict | None, on_event, window: int = DEFAULT_WINDOW, every: int = DEFAULT_EVERY):
        if window < 30:
            raise LinesideError("--drift-window: at least 30 frames")
        self.on_event = on_event
        self.window, self.every = window, every
        self.alarms = 0
        self.rebase(reference)

    def rebase(self, reference: dict | None):
        """Another model's reference (a product switch, an update): the windows start afresh.
        None: nothing to compare with, so nothing is watched."""
        reference = dict(reference or {})
        self.unknown = reference.pop("unknown_rate", None)      # {"expected": share, "n": of how many}
        self.unknowns: deque = deque(maxlen=self.window)
        self.unknown_over = 0
        self.unknown_alarmed = False
        self.reference = reference
        self.values = {name: deque(maxlen=self.window) for name in self.reference}
        self.psi = {name: None for name in self.reference}
        self.z = {name: None for name in self.reference}
        self.alarmed = {name: False for name in self.reference}
        self._over = {name: 0 for name in self.reference}
        self.frames = 0

    def add(self, brightness: float, contrast: float, confidence: float, unknown: bool = False):
        if not self.reference:
            return
        if self.unknown is not None:
            self.unknowns.append(unknown)
        v = self.values
        if "brightness" in v:
            v["brightness"].append(brightness)
        if "contrast" in v:
            v["contrast"].append(contrast)
        if "confidence" in v:
            v["confidence"].append(confidence)
        self.frames += 1
        if self.frames >= self.window and self.frames % self.every == 0:
            self.evaluate()

    def evaluate(self):
        if self.unknown is not None:
            self._unknown_rate()
        for name, ref in self.reference.items():
            values = np.fromiter(self.values[name], np.float64)
            value = psi(_shares(values, ref["edges"]), ref["shares"])
            z = abs(values.mean() - ref["mean"]) / ref["sd"]
            self.psi[name], self.z[name] = round(value, 4), round(float(z), 3)
            self._over[name] = self._over[name] + 1 if value >= ALARM_PSI and z >= ALARM_Z else 0
            if not self.alarmed[name] and self._over[name] >= 2:
                self.alarmed[name] = True
                self.alarms += 1
                self.on_event("drift", f"{name}: mean {values.mean():.3g} over the last {len(values)} frames "
                                       f"against {ref['mean']:.3g} in training ({z:.2f} training SD; PSI "
                                       f"{value:.2f}; alarm at {ALARM_Z} SD and PSI {ALARM_PSI})")
            elif self.alarmed[name] and z < CLEAR_Z:
                self.alarmed[name] = False
                self.on_event("drift_cleared", f"{name}: mean {values.mean():.3g} over the last {len(values)} "
                                               f"frames ({z:.2f} training SD; PSI {value:.2f})")

    def unknown_limit(self) -> float:
        """The unknown share above which the window is out of line with the out-of-fold
        estimate: 3 standard errors (on a third of the window's frames, as parts are held
        for several) plus 5 points, so that a few-shot estimate cannot raise it alone."""
        p = self.unknown["expected"]
        n = max(1, len(self.unknowns) // 3)
        return p + 0.05 + 3 * math.sqrt(max(p * (1 - p), 1e-4) / n)

    def _unknown_rate(self):
        rate = sum(self.unknowns) / max(1, len(self.unknowns))
        limit = self.unknown_limit()
        self.unknown_over = self.unknown_over + 1 if rate > limit else 0
        if not self.unknown_alarmed and self.unknown_over >= 2:
            self.unknown_alarmed = True
            self.alarms += 1
            self.on_event("drift", f"unknown rate: {rate:.1%} of the last {len(self.unknowns)} frames against "
                                   f"{self.unknown['expected']:.1%} expected from out-of-fold predictions "
                                   f"(alarm above {limit:.1%})")
        elif self.unknown_alarmed and rate <= self.unknown["expected"] + 0.05:
            self.unknown_alarmed = False
            self.on_event("drift_cleared", f"unknown rate: {rate:.1%} of the last {len(self.unknowns)} frames")

    def summary(self) -> dict:
        out = {"watching": sorted(self.reference), "psi": dict(self.psi), "z": dict(self.z),
               "alarmed": [k for k, a in self.alarmed.items() if a], "alarms": self.alarms, "window": self.window}
        if self.unknown is not None:
            out["watching"].append("unknown_rate")
            out["unknown_rate"] = {"window": round(sum(self.unknowns) / max(1, len(self.unknowns)), 4),
                                   "expected": self.unknown["expected"]}
            if self.unknown_alarmed:
                out["alarmed"].append("unknown_rate")
        return out
