"""The camera loop: newest frame -> crop -> resize -> infer -> decide -> record.

One capture thread fills a latest-frame slot; the loop keeps up to `engine.depth`
frames in flight and collects results in frame order. When no new frame is
waiting it finishes the oldest request first, so at camera rate every decision
comes out as soon as its inference ends (low latency), and when frames arrive
faster than one inference the requests overlap (throughput).
"""

from __future__ import annotations

import gc
import logging
import resource
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

import cv2
import numpy as np

from lineside.errors import LinesideError
from lineside.spec import resize_to_spec

from .decide import Decider
from .model import RuntimeModel
from .records import Recorder
from .sources import Capture, Closed, Frame, FrameSlot, SourceInfo
from .timings import Timings

log = logging.getLogger(__name__)

BLACK_MEAN = 12.0        # mean grey level (0..255) below which a frame counts as black...
BLACK_STD = 6.0          # ...if it is also this flat
FROZEN_EVENT_FRAMES = 30  # this many repeats in a row are reported as a frozen source


@dataclass(frozen=True)
class LoopSettings:
    roi: tuple[int, int, int, int] | None = None
    loop: bool = False
    pace: float | None = None
    hint: str = "auto"               # auto: throughput for a file read unpaced, else latency
    max_frames: int | None = None
    seconds: float | None = None

    def engine_hint(self, info: SourceInfo) -> str:
        if self.hint != "auto":
            return self.hint
        return "throughput" if not info.live and not self.pace else "latency"


def parse_roi(text: str | None) -> tuple[int, int, int, int] | None:
    if not text:
        return None
    try:
        x, y, w, h = (int(v) for v in str(text).split(","))
    except ValueError:
        raise LinesideError(f"--roi: '{text}' is not x,y,w,h in pixels") from None
    if x < 0 or y < 0 or w < 8 or h < 8:
        raise LinesideError(f"--roi: '{text}' needs x, y >= 0 and a width and height of at least 8")
    return x, y, w, h


@dataclass
class LoopStats:
    frames: int = 0
    labels: Counter = field(default_factory=Counter)
    verdicts: Counter = field(default_factory=Counter)
    flags: Counter = field(default_factory=Counter)
    # runs of one voted label: a count of parts only when parts of one class never follow
    # each other without a change of label between them, which frames alone cannot tell
    voted_runs: Counter = field(default_factory=Counter)
    stages: dict = field(default_factory=lambda: {k: Timings() for k in
                                                  ("capture", "preprocess", "infer", "postprocess", "record")})
    capture_to_decision: Timings = field(default_factory=Timings)
    started: float = 0.0
    ended: float = 0.0


class Preprocessor:
    """ROI crop, resize to the model's size, BGR -> RGB, and frame checks (black, frozen)."""

    def __init__(self, model: RuntimeModel, roi):
        self.spec = model.spec
        self.roi = roi
        self.last = None
        self.frozen_run = 0
        self.checked_roi = False

    def __call__(self, image: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, list[str]]:
        """(1, H, W, 3) RGB input and flags. `out`, if given, receives the input (an
        engine's request buffer: the image is never copied again before inference)."""
        if self.roi:
            image = self._crop(image)
        small = resize_to_spec(image, self.spec)
        if out is None:
            out = np.empty((1, *small.shape), np.uint8)
        cv2.cvtColor(small, cv2.COLOR_BGR2RGB, dst=out[0])
        return out, self._flags(small)

    def prepare(self, frame: Frame, out: np.ndarray | None = None):
        """(input, flags, frozen run), or the error for a frame that cannot be used (it is
        recorded as an event, the loop goes on). A wrong --roi on the first frame is a
        setup error and stops the run."""
        try:
            x, flags = self(frame.image, out)
            return x, flags, self.frozen_run
        except LinesideError:
            raise
        except ValueError as exc:
            return exc

    def _crop(self, image):
        x, y, w, h = self.roi
        H, W = image.shape[:2]
        if not self.checked_roi:
            self.checked_roi = True
            if x + w > W or y + h > H:
                raise LinesideError(f"--roi {x},{y},{w},{h} reaches outside the {W}x{H} frame")
        crop = image[y:min(y + h, H), x:min(x + w, W)]
        if crop.shape[0] < 2 or crop.shape[1] < 2:
            raise ValueError(f"--roi {x},{y},{w},{h} is outside this {W}x{H} frame")
        return crop

    def _flags(self, small: np.ndarray) -> list[str]:
        flags = []
        # The mean first (7x cheaper than mean and deviation): only a dark frame needs both.
        if sum(cv2.mean(small)[:3]) / 3 < BLACK_MEAN:
            _, std = cv2.meanStdDev(small)
            if std.mean() < BLACK_STD:
                flags.append("black")
        # Frozen means identical to the last frame, pixel for pixel: a live sensor always
        # adds some noise, so a repeat comes from a stalled driver or stream, not a still scene.
        if self.last is not None and cv2.norm(small, self.last, cv2.NORM_INF) == 0:
            flags.append("frozen")
            self.frozen_run += 1
        else:
            self.frozen_run = 0
        self.last = small
        return flags


@dataclass
class _InFlight:
    slot: int
    frame: Frame
    flags: list
    t_submit: float


def run_loop(model: RuntimeModel, info: SourceInfo, settings: LoopSettings, decider: Decider,
             recorder: Recorder, stop: threading.Event, on_decision: Callable | None = None,
             opener: Callable | None = None) -> dict:
    """Classify frames from `info` until the source ends, `stop` is set, or the
    frame/time limit is reached. Returns the summary (also written to the log)."""
    hint = settings.engine_hint(info)
    engine = model.engine(hint)
    slot = FrameSlot(block=not info.live and not settings.pace)
    prep = Preprocessor(model, settings.roi)
    capture = Capture(info, slot, stop, loop=settings.loop, pace=settings.pace, on_event=recorder.event,
                      opener=opener, max_frames=settings.max_frames)
    stats = LoopStats()
    pending: deque[_InFlight] = deque()
    free = list(range(engine.depth))[::-1]
    deadline = time.monotonic() + settings.seconds if settings.seconds else None
    last_voted = None
    frozen_reported = False

    def finish(item: _InFlight):
        nonlocal last_voted
        probs = engine.wait(item.slot)
        free.append(item.slot)
        t_done = time.perf_counter()
        decision = decider(probs)
        t_decided = time.perf_counter()
        row = {"ts": time.time(), "frame": item.frame.index, "source": info.text, "origin": item.frame.origin,
               "label": decision.label, "confidence": round(decision.confidence, 6), "top": decision.top,
               "verdict": decision.verdict, "decision": decision.decision,
               "probabilities": {n: round(float(p), 6) for n, p in zip(model.labels, probs)},
               "flags": item.flags, "latency_ms": round((t_decided - item.t_submit) * 1000, 3),
               "capture_to_decision_ms": round((t_decided - item.frame.t_capture) * 1000, 3),
               "model_sha256": model.checksum}
        recorder.decision(row, item.frame.image)
        t_recorded = time.perf_counter()
        st = stats.stages
        st["infer"].add((t_done - item.t_submit) * 1000)
        st["postprocess"].add((t_decided - t_done) * 1000)
        st["record"].add((t_recorded - t_decided) * 1000)
        stats.capture_to_decision.add((t_decided - item.frame.t_capture) * 1000)
        stats.frames += 1
        stats.labels[decision.label] += 1
        if decision.verdict:
            stats.verdicts[decision.verdict] += 1
        for f in item.flags:
            stats.flags[f] += 1
        if decision.decision is not None and decision.decision != last_voted:
            stats.voted_runs[decision.decision] += 1
        last_voted = decision.decision
        if on_decision:
            on_decision(item.frame, decision, stats)

    # Everything loaded so far (the runtimes' Python objects, OpenCV, the model) lives as
    # long as the loop: keep it out of the garbage collector's full passes, which would
    # otherwise hold the GIL for 5-9 ms each (measured) in the middle of a frame.
    # Garbage left from before is collected first, so that none of it is kept for good.
    gc.collect()
    gc.freeze()
    capture.start()
    stats.started = time.perf_counter()
    try:
        while not stop.is_set():
            if deadline and time.monotonic() > deadline:
                break
            try:
                frame = slot.get(timeout=0 if pending else 0.25)
            except Closed:
                break
            if frame is None:
                if pending:
                    finish(pending.popleft())
                continue
            if not free:
                finish(pending.popleft())
            s = free[-1]
            t0 = time.perf_counter()
            prepared = prep.prepare(frame, engine.buffer(s))
            if isinstance(prepared, Exception):   # a frame the ROI does not fit: record, skip, go on
                recorder.event("bad_frame", f"frame {frame.index}: {prepared}")
                continue
            _, flags, frozen_run = prepared
            if frozen_run >= FROZEN_EVENT_FRAMES and not frozen_reported:
                recorder.event("source_frozen", f"{frozen_run} identical frames in a row at frame {frame.index}")
                frozen_reported = True
            elif frozen_run == 0:
                frozen_reported = False
            stats.stages["capture"].add(frame.t_read_ms)
            stats.stages["preprocess"].add((time.perf_counter() - t0) * 1000)
            free.pop()
            t_submit = time.perf_counter()
            engine.submit(s)
            pending.append(_InFlight(s, frame, flags, t_submit))
        while pending:                       # drain: every frame taken is decided and recorded
            finish(pending.popleft())
    finally:
        stats.ended = time.perf_counter()
        stop.set()
        slot.close()
        capture.join(timeout=10)
        gc.unfreeze()   # what the loop no longer needs can be collected again
    if capture.error is not None:
        if isinstance(capture.error, LinesideError):
            raise capture.error
        raise LinesideError(f"--source {info.text}: capture failed ({capture.error})")
    return summarize(stats, capture, slot, hint, engine.depth)


def summarize(stats: LoopStats, capture: Capture, slot: FrameSlot, hint: str, depth: int) -> dict:
    elapsed = max(stats.ended - stats.started, 1e-9)
    return {
        "frames": stats.frames,
        "seconds": round(elapsed, 3),
        "fps": round(stats.frames / elapsed, 2),
        "labels": dict(stats.labels),
        "voted_runs": dict(stats.voted_runs),
        "verdicts": dict(stats.verdicts),
        "flags": dict(stats.flags),
        "dropped": slot.dropped,
        "frames_read": capture.stats.frames,
        "reconnects": capture.stats.reconnects,
        "latency_ms": stats.capture_to_decision.summary(),
        "stages_ms": {k: v.summary() for k, v in stats.stages.items()},
        "rss_mb": round(peak_rss_mb(), 1),
        "engine": {"hint": hint, "requests": depth},
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
