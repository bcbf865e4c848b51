"""Latency samples with bounded memory, for month-long runs: a ring of the newest samples."""

from __future__ import annotations

import numpy as np


class Timings:
    """The newest `capacity` samples (milliseconds) and a running count and mean of all."""

    def __init__(self, capacity: int = 100_000):
        self._ring = np.zeros(capacity, dtype=np.float64)
        self.count = 0
        self.total = 0.0

    def add(self, ms: float):
        self._ring[self.count % len(self._ring)] = ms
        self.count += 1
        self.total += ms

    def values(self) -> np.ndarray:
        return self._ring[:min(self.count, len(self._ring))]

    def summary(self) -> dict:
        v = self.values()
        if not len(v):
            return {"count": 0}
        p50, p95, p99 = np.percentile(v, [50, 95, 99])
        return {"count": self.count, "mean": round(self.total / self.count, 3), "p50": round(float(p50), 3),
                "p95": round(float(p95), 3), "p99": round(float(p99), 3), "max": round(float(v.max()), 3)}
