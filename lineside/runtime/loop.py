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
from .records import DecisionRow, Recorder
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
    source_timeout: float | None = None   # end the run when no frame came for this long

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
    source_timeout: bool = False
    dropped: Callable[[], int] = field(default_factory=lambda: (lambda: 0))   # frames the slot replaced so far


class BadFrame(Exception):
    """A frame that cannot be classified; recorded as an event, the loop goes on."""


class RoiOutside(BadFrame):
    """A frame the ROI does not fit (smaller than the first): decided as unknown, flagged
    roi_outside, never classified from a clipped or stretched crop."""


class Preprocessor:
    """ROI crop, resize to the model's size, BGR -> RGB, and frame checks (black, frozen,
    a size other than the first frame's)."""

    def __init__(self, model: RuntimeModel, roi, first_size: tuple[int, int] | None = None):
        self.spec = model.spec
        self.roi = roi
        self.last = None
        self.frozen_run = 0
        self.first_size = first_size    # given after a product switch: an ROI that does not fit is no setup error
        self.size = None
        self.sizes: set = set()
        self.new_size = False         # this frame has a size no frame before had (the first aside)

    def __call__(self, image: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, list[str]]:
        """(1, H, W, 3) RGB input and flags. `out`, if given, receives the input (an
        engine's request buffer: the image is never copied again before inference).
        Raises BadFrame (RoiOutside) for a frame that cannot be classified; a --roi that
        does not fit the first frame is a setup error (LinesideError) and stops the run."""
        if (not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3
                or image.shape[0] < 2 or image.shape[1] < 2):
            raise BadFrame(f"not an 8-bit colour image (shape {getattr(image, 'shape', None)})")
        size = (image.shape[1], image.shape[0])
        first = self.first_size is None
        if first:
            self.first_size = size
        self.new_size = size not in self.sizes and not first
        self.sizes.add(size)
        self.size = size
        if self.roi:
            x, y, w, h = self.roi
            if x + w > size[0] or y + h > size[1]:
                if first:
                    raise LinesideError(f"--roi {x},{y},{w},{h} reaches outside the {size[0]}x{size[1]} frame")
                raise RoiOutside(f"--roi {x},{y},{w},{h} reaches outside this {size[0]}x{size[1]} frame "
                                 f"(the first was {self.first_size[0]}x{self.first_size[1]})")
            image = image[y:y + h, x:x + w]
        try:
            small = resize_to_spec(image, self.spec)
        except (ValueError, cv2.error) as exc:
            raise BadFrame(str(exc)) from exc
        if out is None:
            out = np.empty((1, *small.shape), np.uint8)
        cv2.cvtColor(small, cv2.COLOR_BGR2RGB, dst=out[0])
        flags = self._flags(small)
        if size != self.first_size:
            flags.append("size_changed")
        return out, flags

    def _flags(self, small: np.ndarray) -> list[str]:
        flags = []
        # One pass for mean and deviation (11 us at 224 px): the black check, and the
        # brightness and contrast that drift alarms watch (runtime/drift.py).
        mean, std = cv2.meanStdDev(small)
        self.brightness, self.contrast = float(mean.mean()), float(std.mean())
        if self.brightness < BLACK_MEAN and self.contrast < BLACK_STD:
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
    image_stats: tuple = (0.0, 0.0)    # brightness, contrast of the model's input


SHAPE_RATIO = 1.25    # frame aspect against the training images' beyond which, without --roi, a run warns
AREA_RATIO = 4.0      # frame area against the training images' beyond which it warns


def shape_warning(size: tuple[int, int], roi, train_size) -> str | None:
    """Why the first frame, without --roi, shows the model other than what it learned on:
    another shape than the training images (the part squeezed or stretched, the background
    beside it inspected too) or a frame many times their size (the part a small patch of
    it). None when it fits, with --roi, or when the bundle does not know its training size."""
    if roi or not train_size or len(train_size) != 2 or min(train_size) <= 0:
        return None
    w, h = size
    th, tw = train_size
    aspect = (w / h) / (tw / th)
    if max(aspect, 1 / aspect) > SHAPE_RATIO:
        why = f"of another shape ({w}x{h} against about {tw}x{th})"
    elif w * h > AREA_RATIO * tw * th:
        why = f"{w * h / (tw * th):.0f}x their size ({w}x{h} against about {tw}x{th})"
    else:
        return None
    return (f"the frames are {why} than the training images and no --roi is given: the model sees the whole "
            "frame, squeezed to its input; give --roi x,y,w,h around the part (lineside data video prints it for "
            "its videos)")


def settle_heap():
    """Everything loaded so far (the runtimes' Python objects, OpenCV, the model) lives as
    long as the loop: keep it out of the garbage collector's full passes, which would
    otherwise hold the GIL for 5-9 ms each (measured) in the middle of a frame. Garbage
    left from before is collected first, so that none of it is kept for good.

    That first pass holds the GIL too, for as long as the heap is big (0.6 s measured in
    the test process, which has torch loaded): run_app settles the heap before the
    trigger watchdog and the outputs start, so that the pass never delays a fail-safe
    answer; the loop's own call then only sees what was made since. Undone by
    gc.unfreeze() when the loop ends."""
    gc.collect()
    gc.freeze()


class FrameHealth:
    """What the frames themselves say of the camera and the --roi, as events, one per run
    of a condition: frames the ROI does not fit (and when it fits again), a first frame
    unlike the training images without --roi, a change of frame size, a frozen source."""

    def __init__(self, recorder: Recorder, roi):
        self.recorder, self.roi = recorder, roi
        self.roi_outside_run = 0
        self.frozen_reported = False
        self.shape_checked = False

    def outside(self, frame: Frame, reason: RoiOutside) -> None:
        if self.roi_outside_run == 0:
            self.recorder.event("roi_outside", f"frame {frame.index}: {reason}; decided unknown until the frames fit")
        self.roi_outside_run += 1

    def inspected(self, frame: Frame, prep: Preprocessor, model: RuntimeModel) -> None:
        """A frame the model will see, after its preprocessing."""
        event = self.recorder.event
        if self.roi_outside_run:
            event("roi_fits", f"frame {frame.index}: the --roi fits the frames again "
                              f"({self.roi_outside_run} frames were not inspected)")
            self.roi_outside_run = 0
        if not self.shape_checked:
            self.shape_checked = True
            warning = shape_warning(prep.size, self.roi, model.metadata.provenance.get("train_image_size"))
            if warning:
                log.warning("%s", warning)
                event("roi_missing", warning)
        if prep.new_size:           # once per size: a folder of mixed sizes is no flood of events
            w, h = prep.size
            event("frame_size", f"frame {frame.index} is {w}x{h}, the first frame was "
                                f"{prep.first_size[0]}x{prep.first_size[1]}")
        frozen_run = prep.frozen_run
        if frozen_run >= FROZEN_EVENT_FRAMES and not self.frozen_reported:
            event("source_frozen", f"{frozen_run} identical frames in a row at frame {frame.index}")
            self.frozen_reported = True
        elif frozen_run == 0:
            self.frozen_reported = False


class FramePipeline:
    """The frames in flight, from a preprocessed frame to a recorded decision: up to
    `engine.depth` requests, finished in frame order; the active product's model, engine,
    preprocessing and decider, swapped between two frames by change_product."""

    def __init__(self, model: RuntimeModel, engine, prep: Preprocessor, decider: Decider, recorder: Recorder,
                 info: SourceInfo, stats: LoopStats, on_decision=None, triggers=None, switch=None, drift=None,
                 shadow=None):
        self.model, self.engine, self.prep, self.decider = model, engine, prep, decider
        self.recorder, self.source, self.stats, self.on_decision = recorder, info.shown, stats, on_decision
        self.triggers, self.switch, self.drift, self.shadow = triggers, switch, drift, shadow
        self.pending: deque[_InFlight] = deque()
        self.free = list(range(engine.depth))[::-1]
        self.last_voted = None

    def record(self, frame: Frame, decision, probabilities: dict, flags: list, t_submit: float, t_decided: float):
        triggers, switch, stats = self.triggers, self.switch, self.stats
        part = None if triggers is None else triggers.offer(frame.t_capture, decision.label, decision.verdict,
                                                            decision.confidence, decision.anomaly_score)
        row = DecisionRow(time.time(), frame.index, self.source, frame.origin, decision.label,
                          round(decision.confidence, 6), decision.top, decision.verdict, decision.decision,
                          probabilities, flags, round((t_decided - t_submit) * 1000, 3),
                          round((t_decided - frame.t_capture) * 1000, 3), self.model.checksum, part,
                          product=switch.active.name if switch is not None else None,
                          anomaly_score=decision.anomaly_score)
        self.recorder.decision(row, frame.image)
        if switch is not None:
            switch.decided()
        if self.shadow is not None:
            self.shadow.offer(frame.image, row, self.prep.first_size)
        stats.capture_to_decision.add((t_decided - frame.t_capture) * 1000)
        stats.frames += 1
        stats.labels[decision.label] += 1
        if decision.verdict:
            stats.verdicts[decision.verdict] += 1
        for f in flags:
            stats.flags[f] += 1
        if decision.decision is not None and decision.decision != self.last_voted:
            stats.voted_runs[decision.decision] += 1
        self.last_voted = decision.decision
        if self.on_decision:
            self.on_decision(frame, decision, stats)

    def after_gap(self, frame: Frame):
        """Frames before a gap in the source say nothing about the part after it."""
        if frame.after_gap:
            self.decider.reset()
            self.last_voted = None

    def finish_oldest(self):
        item = self.pending.popleft()
        probs = self.engine.wait(item.slot)
        self.free.append(item.slot)
        t_done = time.perf_counter()
        self.after_gap(item.frame)
        decision = self.decider(probs)
        t_decided = time.perf_counter()
        if self.drift is not None:
            self.drift.add(*item.image_stats, decision.confidence, decision.label == "unknown")
        self.record(item.frame, decision, {n: round(float(p), 6) for n, p in zip(self.model.labels, probs)},
                    item.flags, item.t_submit, t_decided)
        st = self.stats.stages
        st["infer"].add((t_done - item.t_submit) * 1000)
        st["postprocess"].add((t_decided - t_done) * 1000)
        st["record"].add((time.perf_counter() - t_decided) * 1000)

    def drain(self):
        """Every frame taken is decided and recorded."""
        while self.pending:
            self.finish_oldest()

    def not_inspected(self, frame: Frame, t0: float):
        """A frame the ROI does not fit: the fail-safe answer (unknown, NG with
        --ok-classes), decided in frame order (the caller drained the frames in flight)."""
        self.after_gap(frame)
        self.record(frame, self.decider.not_inspected(), {}, ["roi_outside"], t0, time.perf_counter())

    def submit(self, frame: Frame, slot: int, flags: list):
        self.free.pop()
        t_submit = time.perf_counter()
        self.engine.submit(slot)
        self.pending.append(_InFlight(slot, frame, flags, t_submit, (self.prep.brightness, self.prep.contrast)))

    def change_product(self, product, asked_at: float):
        """Between two frames: the frames in flight decided by the old product, then the
        new one's model, engine, ROI and decider (its vote afresh) for the next frame."""
        t0 = time.perf_counter()
        self.drain()
        old = self.switch.active
        self.model, self.engine, self.decider = product.model, product.engine, product.decider
        self.decider.reset()
        self.prep = Preprocessor(self.model, product.roi, first_size=self.prep.first_size)
        self.free = list(range(self.engine.depth))[::-1]
        self.last_voted = None
        if self.triggers is not None:
            self.triggers.restart(time.perf_counter())
        self.switch.switched(product)
        if self.drift is not None:
            self.drift.rebase(product.model.drift_reference)
        now = time.perf_counter()
        self.recorder.event("product_switch", f"{old.name} -> {product.name} (index {product.index}) after frame "
                                              f"{self.stats.frames}, {(now - asked_at) * 1000:.1f} ms after it was "
                                              f"asked for (the switch itself, frames in flight included: "
                                              f"{(now - t0) * 1000:.2f} ms)")


def _engines(model: RuntimeModel, hint: str, switch):
    """The model's engine for `hint`; with a product switch, every product's engine made
    now, so that a switch loads nothing."""
    engine = model.engine(hint)
    if switch is not None:
        switch.active.engine = engine
        switch.hint = hint
        for product in switch.products:
            if product.engine is None:
                product.engine = product.model.engine(hint)
    return engine


def run_loop(model: RuntimeModel, info: SourceInfo, settings: LoopSettings, decider: Decider,
             recorder: Recorder, stop: threading.Event, on_decision: Callable | None = None,
             opener: Callable | None = None, triggers=None, switch=None, drift=None, shadow=None) -> dict:
    """Classify frames from `info` until the source ends, `stop` is set, the frame/time
    limit is reached, or no frame came for `settings.source_timeout` seconds. With
    `switch` (a ProductSwitch), the product it asks for takes over between two frames.
    Returns the summary (also written to the log)."""
    hint = settings.engine_hint(info)
    engine = _engines(model, hint, switch)
    slot = FrameSlot(block=not info.live and not settings.pace)
    capture = Capture(info, slot, stop, loop=settings.loop, pace=settings.pace, on_event=recorder.event,
                      opener=opener, max_frames=settings.max_frames)
    stats = LoopStats()
    stats.dropped = lambda: slot.dropped
    run = FramePipeline(model, engine, Preprocessor(model, settings.roi), decider, recorder, info, stats,
                        on_decision, triggers, switch, drift, shadow)
    del model, engine, decider     # the pipeline holds them: after an update, nothing holds the old ones
    health = FrameHealth(recorder, settings.roi)
    settle_heap()
    capture.start()
    stats.started = time.perf_counter()
    try:
        _frames(run, health, slot, settings, stop, info)
    finally:
        stats.ended = time.perf_counter()
        stop.set()
        slot.close()
        capture.join(timeout=10)
        gc.unfreeze()   # what the loop no longer needs can be collected again
    if capture.error is not None:
        if isinstance(capture.error, LinesideError):
            raise capture.error
        raise LinesideError(f"--source {info.shown}: capture failed ({capture.error})")
    summary = summarize(stats, capture, slot, hint, run.engine.depth)
    if drift is not None:
        summary["drift"] = drift.summary()
    return summary


def _frames(run: FramePipeline, health: FrameHealth, slot: FrameSlot, settings: LoopSettings,
            stop: threading.Event, info: SourceInfo) -> None:
    """The loop itself: the newest frame in, preprocessed into a free request, submitted;
    the oldest request finished when no frame waits or none is free."""
    deadline = time.monotonic() + settings.seconds if settings.seconds else None
    last_frame_at = time.monotonic()
    while not stop.is_set():
        now = time.monotonic()
        if deadline and now > deadline:
            break
        if run.switch is not None and (taken := run.switch.take()) is not None:
            run.change_product(*taken)
        if settings.source_timeout and now - last_frame_at > settings.source_timeout:
            run.stats.source_timeout = True
            run.recorder.event("source_timeout", f"no frame from '{info.shown}' for {now - last_frame_at:.1f} s "
                                                 f"(--source-timeout {settings.source_timeout:g}); the run ends")
            break
        try:
            frame = slot.get(timeout=0 if run.pending else 0.25)
        except Closed:
            break
        if frame is None:
            if run.pending:
                run.finish_oldest()
            continue
        last_frame_at = time.monotonic()
        if not run.free:
            run.finish_oldest()
        s = run.free[-1]
        t0 = time.perf_counter()
        try:
            _, flags = run.prep(frame.image, run.engine.buffer(s))
        except RoiOutside as exc:
            run.drain()
            health.outside(frame, exc)
            run.not_inspected(frame, t0)
            continue
        except BadFrame as exc:      # record, skip, go on
            run.recorder.event("bad_frame", f"frame {frame.index}: {exc}")
            continue
        health.inspected(frame, run.prep, run.model)
        run.stats.stages["capture"].add(frame.t_read_ms)
        run.stats.stages["preprocess"].add((time.perf_counter() - t0) * 1000)
        run.submit(frame, s, flags)
    run.drain()


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
        "decode_errors": capture.stats.decode_errors,
        "source_timeout": stats.source_timeout,
        "latency_ms": stats.capture_to_decision.summary(),
        "stages_ms": {k: v.summary() for k, v in stats.stages.items()},
        "rss_mb": round(peak_rss_mb(), 1),
        "engine": {"hint": hint, "requests": depth},
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
