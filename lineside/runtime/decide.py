"""From class probabilities to a decision on the line.

    label     the top class, or "unknown" when its probability is below --reject-below
    verdict   OK / NG when --ok-classes is given (unknown counts as NG: a person takes a look)
    decision  with --vote N/M, the label seen in at least N of the last M frames
              (debounce for parts that stay in view); None while no label has N votes
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

import numpy as np

from lineside.errors import LinesideError

UNKNOWN = "unknown"


def parse_vote(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        n, m = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise LinesideError(f"--vote: '{text}' is not N/M (for example 3/5)") from None
    if not 1 <= n <= m <= 1000:
        raise LinesideError(f"--vote: '{text}' needs 1 <= N <= M <= 1000")
    return n, m


def parse_classes(text: str | None, labels: list[str], option: str) -> tuple[str, ...] | None:
    if not text:
        return None
    names = tuple(c.strip() for c in str(text).split(",") if c.strip())
    unknown = [c for c in names if c not in labels]
    if unknown or not names:
        raise LinesideError(f"{option}: {', '.join(unknown) or 'empty'} not among the model's labels "
                            f"({', '.join(labels)})")
    return names


@dataclass(frozen=True)
class Decision:
    label: str
    confidence: float
    top: str                  # the top class even when rejected
    verdict: str | None       # OK / NG, or None without --ok-classes
    decision: str | None      # the voted label (= label without --vote)
    anomaly_score: float | None = None   # an anomaly model's score / its threshold (above 1: anomalous)


class Decider:
    def __init__(self, labels: list[str], reject_below: float | None = None,
                 ok_classes: tuple[str, ...] | None = None, vote: tuple[int, int] | None = None,
                 anomaly: dict | None = None):
        if reject_below is not None and not 0.0 <= reject_below <= 1.0:
            raise LinesideError(f"--reject-below: {reject_below} is outside 0..1")
        self.labels = list(labels)
        self.reject_below = reject_below
        self.ok_classes = set(ok_classes) if ok_classes else None
        self.vote = vote
        # an anomaly model's probabilities are sigmoid((score - threshold) / scale): their
        # log-odds give back the score, relative to the threshold
        self.anomaly_scale = (anomaly["scale"] / anomaly["threshold"]) if anomaly and anomaly.get("scale") else None
        self._recent: deque[str] = deque(maxlen=vote[1] if vote else 1)

    def __call__(self, probs: np.ndarray) -> Decision:
        i = int(np.argmax(probs))
        confidence = float(probs[i])
        top = self.labels[i]
        label = UNKNOWN if self.reject_below is not None and confidence < self.reject_below else top
        verdict = None if self.ok_classes is None else ("OK" if label in self.ok_classes else "NG")
        return Decision(label, confidence, top, verdict, self._voted(label), self._anomaly_score(probs))

    def _anomaly_score(self, probs) -> float | None:
        if self.anomaly_scale is None or len(probs) != 2:
            return None
        p = np.clip(np.asarray(probs, np.float64), 1e-300, None)
        score = 1.0 + self.anomaly_scale * float(np.log(p[1]) - np.log(p[0]))
        return round(max(0.0, score), 6) if np.isfinite(score) else None

    def not_inspected(self) -> Decision:
        """The fail-safe decision for a frame that could not be classified: unknown (NG
        with OK classes), and an unknown vote."""
        verdict = None if self.ok_classes is None else "NG"
        return Decision(UNKNOWN, 0.0, "", verdict, self._voted(UNKNOWN))

    def _voted(self, label: str) -> str | None:
        if self.vote is None:
            return label
        self._recent.append(label)
        best, count = Counter(self._recent).most_common(1)[0]
        return best if count >= self.vote[0] else None

    def reset(self):
        """Forget the vote history: the loop calls it on the first frame after a gap in
        the source, so frames from before the gap never vote on the part after it."""
        self._recent.clear()
