"""Part-triggered inspection with a fail-safe answer: `lineside run ... --trigger stdin|mqtt`.

A trigger (a line on stdin, or a message on PREFIX/trigger) asks for the decision on
the part in front of the camera now, optionally naming its part id. The loop keeps
deciding every frame; the first frame captured after the trigger answers it (with
--vote N/M, the next M frames, voted). The rule: a trigger is answered only by frames
captured after it, and a frame answers every trigger waiting for it, so a burst of
triggers is answered by the frame (or frames) that follow the burst, all of them
together, never one per frame (a decision row that answers several parts names them
all, joined by ','). When no answer is ready within
--trigger-timeout, a watchdog answers for it: NG, with the reason (`no_frame`: not one
frame came, the source is down; `timeout`: frames came but too few, or too late); parts
waiting when the run ends are answered NG `stopped`, or `error` when the loop failed
(a model or capture error).
Never silence: a PLC waiting on the answer always gets one in its window.

Each answer goes to every output: a JSON line on stdout (stdin trigger), PREFIX/answer
(MQTT), and the log (the answering decisions carry the part id; a `part_answer`
event holds the answer).
"""

from __future__ import annotations

import datetime
import itertools
import json
import logging
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from lineside.errors import LinesideError

log = logging.getLogger(__name__)

TRIGGERS = ("stdin", "mqtt", "opcua", "modbus")
MAX_PENDING = 1000


@dataclass
class Request:
    part_id: str
    t: float                      # time.perf_counter() of the trigger
    ts: float                     # wall clock
    after: float = 0.0            # only frames captured from then on count (the trigger, or a product switch)
    labels: list = field(default_factory=list)
    verdicts: list = field(default_factory=list)
    confidences: list = field(default_factory=list)
    scores: list = field(default_factory=list)       # an anomaly model's scores / threshold


@dataclass(frozen=True)
class Answer:
    part_id: str
    label: str
    verdict: str                  # OK or NG
    reason: str                   # decided | no_frame | timeout | stopped | error
    frames: int
    confidence: float
    latency_ms: float
    ts: float
    anomaly_score: float | None = None   # the highest of its frames' (anomaly models)

    def as_dict(self) -> dict:
        return {"part_id": self.part_id, "label": self.label, "verdict": self.verdict, "reason": self.reason,
                "frames": self.frames, "confidence": round(self.confidence, 6), "latency_ms": round(self.latency_ms, 3),
                "time": datetime.datetime.fromtimestamp(self.ts).astimezone().isoformat(timespec="milliseconds"),
                "ts": self.ts, **({"anomaly_score": self.anomaly_score} if self.anomaly_score is not None else {})}


class Triggers:
    """Pending requests, answered by the loop (offer) or by the watchdog on timeout."""

    def __init__(self, timeout_s: float, frames: int = 1, votes: int = 1,
                 on_answer: Callable[[Answer], None] = lambda a: None):
        if not timeout_s > 0:
            raise LinesideError("--trigger-timeout: must be positive (milliseconds)")
        self.timeout = timeout_s
        self.frames, self.votes = frames, votes
        self.on_answer = on_answer
        self._pending: list[Request] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._ids = itertools.count(1)
        self._closed = False
        self.answered = Counter()
        self._watchdog = threading.Thread(target=self._watch, name="lineside-trigger-watchdog", daemon=True)
        self._watchdog.start()

    def request(self, part_id: str | None = None) -> str:
        """A trigger (any thread): the next frame(s) decide this part."""
        part = str(part_id).strip() if part_id not in (None, "") else f"part-{next(self._ids)}"
        with self._lock:
            if self._closed:
                return part
            if len(self._pending) >= MAX_PENDING:
                log.warning("trigger %s ignored: %d parts already wait for an answer", part, MAX_PENDING)
                return part
            now = time.perf_counter()
            self._pending.append(Request(part[:200], now, time.time(), after=now))
            self._wake.notify()
        return part

    def offer(self, t_capture: float, label: str, verdict: str | None, confidence: float,
              anomaly_score: float | None = None) -> str | None:
        """A decided frame (the loop): it counts for every part whose trigger came before the
        frame was captured and that still waits for frames. Returns the ids of those parts
        (joined by ',' when several), or None."""
        parts, answers = [], []
        with self._lock:
            for req in list(self._pending):
                if t_capture >= req.after and len(req.labels) < self.frames:
                    req.labels.append(label)
                    req.verdicts.append(verdict)
                    req.confidences.append(confidence)
                    if anomaly_score is not None:
                        req.scores.append(anomaly_score)
                    parts.append(req.part_id)
                    if len(req.labels) == self.frames:
                        self._pending.remove(req)
                        answers.append(self._decided(req))
        for answer in answers:
            self._answer(answer)
        return ",".join(parts) if parts else None

    def restart(self, t: float):
        """A product switch at perf_counter() time t: the parts still waiting forget the votes
        of the old product and are answered by frames captured from t on (their timeout
        still runs from their trigger)."""
        with self._lock:
            for req in self._pending:
                req.labels.clear()
                req.verdicts.clear()
                req.confidences.clear()
                req.scores.clear()
                req.after = max(req.after, t)

    def close(self, reason: str = "stopped"):
        """End of the run: every part still waiting is answered NG with `reason` (stopped, or
        error when the loop itself failed)."""
        with self._lock:
            self._closed = True
            left, self._pending = self._pending, []
            self._wake.notify()
        for req in left:
            self._answer(self._failsafe(req, reason))

    # -- internals ------------------------------------------------------------------------

    def _decided(self, req: Request) -> Answer:
        label, count = Counter(req.labels).most_common(1)[0]
        if count < self.votes:
            label = "unknown"
        picked = [v for lab, v in zip(req.labels, req.verdicts) if lab == label]
        verdict = "OK" if label != "unknown" and picked and all(v == "OK" for v in picked) else "NG"
        conf = max((c for lab, c in zip(req.labels, req.confidences) if lab == label), default=0.0)
        return Answer(req.part_id, label, verdict, "decided", len(req.labels), conf,
                      (time.perf_counter() - req.t) * 1000, time.time(), max(req.scores) if req.scores else None)

    def _failsafe(self, req: Request, reason: str) -> Answer:
        return Answer(req.part_id, "unknown", "NG", reason, len(req.labels), 0.0,
                      (time.perf_counter() - req.t) * 1000, time.time())

    def _answer(self, answer: Answer):
        self.answered[answer.reason] += 1
        try:
            self.on_answer(answer)
        except Exception as exc:  # noqa: BLE001 - an output failing never stops the others
            log.error("trigger answer for %s could not be delivered: %s", answer.part_id, exc)

    def _watch(self):
        while True:
            late = []
            with self._lock:
                if self._closed:
                    return
                now = time.perf_counter()
                for req in list(self._pending):
                    if now - req.t >= self.timeout:
                        self._pending.remove(req)
                        late.append(req)
                nearest = min((req.t + self.timeout for req in self._pending), default=None)
                if not late:
                    self._wake.wait(None if nearest is None else max(0.0, nearest - now))
            for req in late:
                self._answer(self._failsafe(req, "timeout" if req.labels else "no_frame"))


class StdinTrigger(threading.Thread):
    """One trigger per line on stdin (the line, if not empty, is the part id); answers are
    JSON lines on stdout."""

    def __init__(self, triggers: Triggers, stream=None):
        super().__init__(name="lineside-stdin-trigger", daemon=True)
        self.triggers = triggers
        self.stream = stream or sys.stdin

    def run(self):
        for line in self.stream:
            self.triggers.request(line.strip() or None)


def print_answer(answer: Answer):
    sys.stdout.write(json.dumps(answer.as_dict()) + "\n")
    sys.stdout.flush()
