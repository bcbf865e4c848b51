"""`lineside bench`: the real camera loop against the two things it must beat, in one run.

    pipeline   lineside's loop (capture thread, requests in flight, decisions, SQLite log)
    naive      one thread: read, resize, convert, infer, argmax, repeat
    raw        the backend alone on one prepared image, as many requests as it likes
    decode     one thread reading, cropping and resizing frames, no inference

From raw and decode follows the ceiling: the frame rate the cores could reach if
the loop cost nothing but decoding and inference (see ceiling_fps).

The ratios pipeline/naive and pipeline/raw say what the loop costs and what it buys.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from lineside.spec import resize_to_spec

from .decide import Decider
from .loop import LoopSettings, parse_roi, peak_rss_mb, run_loop
from .model import RuntimeModel
from .records import Recorder
from .sources import SourceInfo, describe_source, open_video_file


def synthetic_video(folder: Path, frames: int = 300, size=(640, 480), fps: float = 30.0) -> Path:
    """A short video of drawn parts, for a bench without --source (no dataset needed)."""
    from lineside.synth import CLASSES, draw_part

    rng = np.random.default_rng(0)
    path = folder / "bench.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    try:
        for i in range(frames):
            img = draw_part(CLASSES[i % len(CLASSES)], min(size), rng)
            frame = np.full((size[1], size[0], 3), 96, np.uint8)
            x = (size[0] - img.shape[1]) // 2
            y = (size[1] - img.shape[0]) // 2
            frame[y:y + img.shape[0], x:x + img.shape[1]] = img[:, :, ::-1]
            writer.write(frame)
    finally:
        writer.release()
    return path


def _timed_frames(cap, seconds: float, roi=None):
    """Frames of an open file, cropped to roi, looping at its end, for `seconds`."""
    t0 = time.perf_counter()
    try:
        while time.perf_counter() - t0 < seconds:
            ok, frame = cap.read()
            if not ok:
                cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                ok, frame = cap.read()
                if not ok:
                    return
            yield frame[roi[1]:roi[1] + roi[3], roi[0]:roi[0] + roi[2]] if roi else frame
    finally:
        cap.release()


def naive_fps(model: RuntimeModel, info: SourceInfo, seconds: float, roi=None) -> float:
    """The loop everyone writes first, on the same source, region and model."""
    n, t0 = 0, time.perf_counter()
    for frame in _timed_frames(cv2.VideoCapture(info.text), seconds, roi):
        x = cv2.cvtColor(resize_to_spec(frame, model.spec), cv2.COLOR_BGR2RGB)
        int(np.argmax(model.predict_proba(x[None])[0]))
        n += 1
    return n / (time.perf_counter() - t0)


def decode_fps(model: RuntimeModel, info: SourceInfo, seconds: float, roi=None) -> float:
    """Frames per second one thread can read, crop and resize: the work every frame costs
    besides inference."""
    n, t0 = 0, time.perf_counter()
    for frame in _timed_frames(open_video_file(info.text), seconds, roi):
        resize_to_spec(frame, model.spec)
        n += 1
    return n / (time.perf_counter() - t0)


def ceiling_fps(raw: float, decode: float, cores: int) -> float:
    """The most frames per second `cores` cores can classify when each frame costs
    cores/raw core-seconds of inference (raw: all cores busy) plus 1/decode of reading
    and resizing: what the loop would reach with no overhead of its own."""
    return cores / (cores / raw + 1.0 / decode)


def raw_fps(model: RuntimeModel, seconds: float, hint: str = "throughput") -> float:
    """The backend alone: one prepared image, all requests busy."""
    engine = model.engine(hint)
    x = np.random.default_rng(0).integers(0, 256, (1, model.spec.height, model.spec.width, 3), dtype=np.uint8)
    for s in range(engine.depth):       # warm up every request
        engine.submit(s, x)
        engine.wait(s)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        s = n % engine.depth
        if n >= engine.depth:
            engine.wait(s)
        engine.submit(s)
        n += 1
    for s in range(min(n, engine.depth)):
        engine.wait(s)
    return n / (time.perf_counter() - t0)


class _PageReader:
    """The status page served, and read as an open browser reads it: /api/status and the
    last frame once a second, /metrics every 5 s (a Prometheus scrape)."""

    def __init__(self, server):
        self.server, self.url, self.reads = server, server.url, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import urllib.request

        tick = 0
        while not self._stop.wait(1.0):
            paths = ["api/status", "frame/last.jpg"] + (["metrics"] if tick % 5 == 0 else [])
            for path in paths:
                try:
                    with urllib.request.urlopen(self.url + path, timeout=5) as r:
                        r.read()
                    self.reads += 1
                except OSError:
                    pass
            tick += 1

    def close(self):
        self._stop.set()
        self._thread.join(timeout=10)
        self.server.close()


def _open_page(model: RuntimeModel, info: SourceInfo, address: str):
    from .web import LivePage, StatusServer, model_summary

    page = LivePage("bench", model_summary(model), info.shown)
    return page, _PageReader(StatusServer(address, page).start())


def bench(model: RuntimeModel, source: str | None, seconds: float = 10.0, pace: float | None = None,
          hint: str = "auto", log: bool = True, roi: str | None = None, http: str | None = None,
          compare: bool = True) -> dict:
    """The camera loop on `model` for `seconds`; with `compare`, also a naive loop, decoding
    alone and the raw backend, in the same run."""
    with tempfile.TemporaryDirectory(prefix="lineside-bench-") as tmp:
        tmp = Path(tmp)
        info = describe_source(source) if source else SourceInfo(str(synthetic_video(tmp)), "file", False)
        settings = LoopSettings(roi=parse_roi(roi), loop=not info.live, pace=pace, hint=hint, seconds=seconds)
        page = reader = None
        if http:
            page, reader = _open_page(model, info, http)
        recorder = Recorder(tmp / "bench.sqlite" if log else None,
                            {"source": info.shown, "model": str(model.path), "model_sha256": model.checksum,
                             "labels": model.labels, "settings": {"bench": True}}, outputs=(page,) if page else ())
        stop = threading.Event()
        try:
            summary = run_loop(model, info, settings, Decider(model.labels), recorder, stop,
                               on_decision=page.observe if page else None)
        finally:
            recorder.close()
            if reader:
                reader.close()
        rss = peak_rss_mb()
        result = {
            "model": str(model.path), "backend": model.backend, "source": source or "synthetic video",
            "pace": pace, "roi": roi, "seconds": seconds,
            "fps": summary["fps"], "latency_ms": summary["latency_ms"], "stages_ms": summary["stages_ms"],
            "dropped": summary["dropped"], "frames": summary["frames"], "rss_mb": round(rss, 1),
            "engine": summary["engine"], "logged": recorder.written,
        }
        if reader:
            result["http"] = {"url": reader.url, "page_reads": reader.reads}
        if not compare:
            return result
        if info.kind == "file":
            result["naive_fps"] = round(naive_fps(model, info, seconds, settings.roi), 2)
            result["decode_fps"] = round(decode_fps(model, info, seconds / 2, settings.roi), 2)
        result["raw_fps"] = round(raw_fps(model, seconds), 2)
        if "decode_fps" in result and not pace:
            cores = os.cpu_count() or 1
            result["ceiling_fps"] = round(ceiling_fps(result["raw_fps"], result["decode_fps"], cores), 2)
    if result.get("naive_fps"):
        result["fps_vs_naive"] = round(result["fps"] / result["naive_fps"], 3)
    result["fps_vs_raw"] = round(result["fps"] / result["raw_fps"], 3)
    if result.get("ceiling_fps"):
        result["fps_vs_ceiling"] = round(result["fps"] / result["ceiling_fps"], 3)
    return result
