"""Frame sources for the camera loop: camera index, video file, RTSP/HTTP URL,
GStreamer pipeline, folder of images.

A capture thread reads frames and writes them into a latest-frame slot. The
consumer always gets the newest frame; a frame it had no time for is overwritten
and counted as dropped, so decisions are never made on stale frames and lag
cannot build up. A finite source read unpaced (a file or folder, as fast as it
allows) blocks instead of overwriting, so every frame is classified.

A lost or stalled live source is reopened with exponential backoff and the gap
is recorded as an event; no frame is ever invented to fill it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from lineside.errors import LinesideError
from lineside.images import BadImage, is_image_file, read_image
from lineside.text import redact_url

from .timings import Timings

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".mjpeg", ".mjpg", ".webm", ".ts", ".mpg", ".h264")
URL_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://", "udp://", "tcp://", "rtmp://")
OPEN_TIMEOUT_MS = 5000
READ_TIMEOUT_MS = 5000
MAX_DECODE_SKIPS = 100    # failed reads in a row that mean the end of a video file, not damage


@dataclass
class Frame:
    image: np.ndarray          # HxWx3 uint8, BGR (OpenCV's order; converted after resizing)
    index: int                 # running number of frames read from the source
    t_capture: float           # time.perf_counter() when the read returned
    t_read_ms: float           # how long the read took
    origin: str = ""           # file name for folder sources
    after_gap: bool = False    # the first frame after the source was lost and came back


@dataclass
class SourceInfo:
    text: str
    kind: str                  # camera | file | url | gstreamer | folder
    live: bool                 # live sources drop frames and reconnect; files end
    shown: str = field(init=False)   # what messages and records say: no password, valid UTF-8

    def __post_init__(self):
        self.shown = redact_url(self.text)


def describe_source(text: str) -> SourceInfo:
    """Classify a --source argument."""
    text = str(text).strip()
    if not text:
        raise LinesideError("--source: empty")
    if text.isdigit():
        return SourceInfo(text, "camera", True)
    if text.lower().startswith(URL_SCHEMES):
        return SourceInfo(text, "url", True)
    if "!" in text and ("appsink" in text or "src" in text):
        return SourceInfo(text, "gstreamer", True)
    path = Path(text)
    if path.is_dir():
        return SourceInfo(text, "folder", False)
    if path.is_file():
        return SourceInfo(text, "file", False)
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        raise LinesideError(f"--source: {path}: no such video file")
    raise LinesideError(f"--source: '{text}' is not a camera index, a video file, a folder of images, "
                        f"a URL (rtsp://, http://...) or a GStreamer pipeline")


# --- readers: one open source, read() -> BGR frame or None -----------------------------

def quiet_video_libraries():
    """OpenCV and FFmpeg print their own warnings to stderr (a truncated file gives 'moov
    atom not found' and a capture warning before lineside's one-line error): lineside
    reports what went wrong itself, so theirs are silenced unless OPENCV_LOG_LEVEL or
    OPENCV_FFMPEG_LOGLEVEL is set."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")       # AV_LOG_QUIET
    if "OPENCV_LOG_LEVEL" not in os.environ:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def open_video_file(path: str) -> cv2.VideoCapture:
    """A video file with one decoding thread: the capture thread already runs beside
    inference, and FFmpeg's own thread pool only adds threads that compete for the same
    cores (measured: 3-4% more frames per second through the loop on 2 cores)."""
    quiet_video_libraries()
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise LinesideError(f"--source {path}: the file is empty")
    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
    if not cap.isOpened():     # a format only another backend reads
        cap = cv2.VideoCapture(path)
    return cap


class VideoReader:
    """cv2.VideoCapture around a camera index, file, URL or GStreamer pipeline.

    In a video file a frame that fails to decode is skipped: reading goes on past it
    (up to MAX_DECODE_SKIPS failures in a row, which is the end of the file) and the
    skipped frames are a `decode_error` event with their position."""

    def __init__(self, info: SourceInfo, on_event: Callable[[str, str], None] | None = None):
        self.info = info
        self.on_event = on_event or (lambda kind, detail: None)
        self.decoded = 0
        quiet_video_libraries()
        if info.kind == "camera":
            self.cap = cv2.VideoCapture(int(info.text))
        elif info.kind == "gstreamer":
            self.cap = cv2.VideoCapture(info.text, cv2.CAP_GSTREAMER)
        elif info.kind == "url":
            # Bounded waits: a stalled stream must return from read() so it can be reconnected.
            self.cap = cv2.VideoCapture(info.text, cv2.CAP_FFMPEG,
                                        [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, OPEN_TIMEOUT_MS,
                                         cv2.CAP_PROP_READ_TIMEOUT_MSEC, READ_TIMEOUT_MS])
        else:
            self.cap = open_video_file(info.text)
        if info.kind in ("camera", "url"):
            self.cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)   # where the backend honours it: less queued lag
        if not self.cap.isOpened():
            self.cap.release()
            if info.kind == "file":
                raise LinesideError(f"--source {info.shown}: cannot be read as a video (damaged, truncated, "
                                    "or a format this OpenCV cannot decode)")
            raise OSError(f"cannot open {info.kind} source '{info.shown}'")
        fps = self.cap.get(cv2.CAP_PROP_FPS)
        self.fps = fps if 0 < fps < 1000 else None

    def read(self) -> tuple[np.ndarray | None, str]:
        ok, image = self.cap.read()
        if ok and image is not None and image.size:
            self.decoded += 1
            return image, ""
        if self.info.kind != "file":
            return None, ""
        for failed in range(1, MAX_DECODE_SKIPS):
            ok, image = self.cap.read()
            if ok and image is not None and image.size:
                self.on_event("decode_error", f"{self.info.shown}: {failed} frame(s) after frame {self.decoded} "
                                              "could not be decoded and were skipped")
                self.decoded += 1
                return image, ""
        return None, ""

    def release(self):
        self.cap.release()


class FolderReader:
    """The images in a folder (recursive, sorted), one frame each. A file that
    cannot be read is logged and skipped: bad input never stops the loop."""

    fps = None

    def __init__(self, info: SourceInfo, on_bad: Callable[[str, str], None] | None = None):
        root = Path(info.text)
        self.files = sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(p))
        if not self.files:
            raise LinesideError(f"--source: {root}: folder holds no images")
        self.pos = 0
        self.on_bad = on_bad

    def read(self) -> tuple[np.ndarray | None, str]:
        while self.pos < len(self.files):
            path = self.files[self.pos]
            self.pos += 1
            try:
                return cv2.cvtColor(read_image(path), cv2.COLOR_RGB2BGR), path.name
            except BadImage as exc:
                if self.on_bad:
                    self.on_bad("bad_image", str(exc))
        return None, ""

    def release(self):
        pass


def open_reader(info: SourceInfo, on_event=None):
    return FolderReader(info, on_event) if info.kind == "folder" else VideoReader(info, on_event)


def unfixable(info: SourceInfo) -> str | None:
    """Why a live source that failed to open will not open by retrying, or None (an
    outage: retry). Asked only before the source ever worked: a camera that was
    there and went away is retried."""
    if info.kind == "camera" and sys.platform.startswith("linux") and Path("/dev").is_dir():
        device = Path(f"/dev/video{int(info.text)}")
        if not device.exists():
            here = sorted(str(p) for p in Path("/dev").glob("video[0-9]*"))
            return f"no such camera ({device} does not exist; cameras here: {', '.join(here) or 'none'})"
    if info.kind == "gstreamer" and not gstreamer_available():
        return ("this OpenCV was built without GStreamer, so a GStreamer pipeline cannot be opened "
                "(install an OpenCV built with GStreamer, or give the camera as an index, file or URL)")
    return None


def gstreamer_available() -> bool:
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line.split(":", 1)[1].upper()
    return False


# --- the latest-frame slot ---------------------------------------------------------------

class Closed(Exception):
    """The slot is closed and empty: the source ended or the loop is stopping."""


class FrameSlot:
    """Holds at most one frame. put() overwrites an unread frame and counts it as
    dropped, unless `block` is set, in which case put() waits until the frame
    before it was taken (used for finite sources read as fast as possible)."""

    def __init__(self, block: bool = False):
        self.block = block
        self._frame: Frame | None = None
        self._closed = False
        self._cond = threading.Condition()
        self.dropped = 0

    def put(self, frame: Frame) -> bool:
        with self._cond:
            if self.block:
                while self._frame is not None and not self._closed:
                    self._cond.wait()
            if self._closed:
                return False
            if self._frame is not None:
                self.dropped += 1
            self._frame = frame
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None = None) -> Frame | None:
        """The newest frame; None when none arrived within `timeout`; raises Closed
        when the source is finished and nothing is left."""
        with self._cond:
            if self._frame is None and not self._closed and timeout != 0:
                self._cond.wait_for(lambda: self._frame is not None or self._closed, timeout)
            frame, self._frame = self._frame, None
            if frame is None and self._closed:
                raise Closed
            if frame is not None:
                self._cond.notify_all()
            return frame

    def close(self):
        with self._cond:
            self._closed = True
            self._cond.notify_all()


# --- the capture thread ------------------------------------------------------------------

@dataclass
class CaptureStats:
    frames: int = 0
    reconnects: int = 0
    decode_errors: int = 0
    read_ms: Timings = field(default_factory=Timings)


class Capture(threading.Thread):
    """Reads a source into a FrameSlot until the source ends or `stop` is set.

    `pace` (frames per second) replays a file at camera rate; `loop` restarts a
    finite source at its end. `opener` makes a reader (injectable for tests).
    `on_event(kind, detail)` records gaps, reconnects and bad files."""

    def __init__(self, info: SourceInfo, slot: FrameSlot, stop: threading.Event, *, loop: bool = False,
                 pace: float | None = None, on_event: Callable[[str, str], None] | None = None,
                 opener: Callable | None = None, backoff: tuple[float, float] = (0.5, 10.0),
                 max_frames: int | None = None):
        super().__init__(name="lineside-capture", daemon=True)
        self.info, self.slot, self.stop = info, slot, stop
        self.loop, self.pace, self.max_frames = loop, pace, max_frames
        self.on_event = on_event or (lambda kind, detail: None)
        self.opener = opener or (lambda i: open_reader(i, self._reader_event))
        self.backoff = backoff
        self.stats = CaptureStats()
        self.error: BaseException | None = None
        self.fps: float | None = None
        self.opened = False

    def run(self):
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - reported by the consumer, never lost silently
            self.error = exc
            if isinstance(exc, LinesideError):    # the user's to fix: the one-line error says it all
                log.debug("capture stopped: %s", exc)
            else:
                log.exception("capture thread failed")
        finally:
            self.slot.close()

    def _reader_event(self, kind: str, detail: str):
        if kind == "decode_error":
            self.stats.decode_errors += 1
        self.on_event(kind, detail)

    def _open(self):
        """Open the source; live sources retry with backoff until stopped, unless the
        source never opened and retrying cannot help (see unfixable)."""
        delay = self.backoff[0]
        while not self.stop.is_set():
            try:
                reader = self.opener(self.info)
                self.fps = self.fps or getattr(reader, "fps", None)
                self.opened = True
                return reader
            except LinesideError:
                raise
            except Exception as exc:  # noqa: BLE001 - OpenCV and OS errors alike
                if not self.info.live:
                    raise LinesideError(f"--source: {exc}") from exc
                reason = None if self.opened else unfixable(self.info)
                if reason:
                    raise LinesideError(f"--source {self.info.shown}: {reason}") from exc
                self.on_event("source_unavailable", f"{exc}; retrying in {delay:.1f} s")
                if self.stop.wait(delay):
                    return None
                delay = min(delay * 2, self.backoff[1])
        return None

    def _run(self):
        reader = self._open()
        next_due = time.perf_counter()
        period = 1.0 / self.pace if self.pace else 0.0
        last_frame_at = time.time()   # for the gap: a stalled stream is lost from its last frame on
        after_gap = False
        read_guess = 0.0        # a running estimate of the read time, for pacing
        while reader is not None and not self.stop.is_set():
            if self.pace:
                # Read (decode) just before the frame is due, not right after the previous
                # one went out: decoding then overlaps idle time, not the previous frame's
                # inference, as with a camera that delivers each frame when it is taken.
                early = next_due + period - 2 * read_guess - 0.001 - time.perf_counter()
                if early > 0 and self.stop.wait(early):
                    break
            t0 = time.perf_counter()
            image, origin = reader.read()
            t1 = time.perf_counter()
            if image is None:
                reader.release()
                if self.info.live:
                    self.on_event("source_lost", f"no frame from '{self.info.shown}' for "
                                                 f"{time.time() - last_frame_at:.1f} s; reconnecting")
                    self.stats.reconnects += 1
                    reader = self._open()
                    after_gap = True
                    continue
                if self.loop and self.stats.frames > 0:
                    reader = self._open()
                    continue
                return
            read_ms = (t1 - t0) * 1000
            read_guess = (t1 - t0) if not read_guess else 0.9 * read_guess + 0.1 * (t1 - t0)
            if self.pace:
                # Release frames at camera rate; a late frame goes out at once, it is not skipped.
                # For a replayed file the release is the moment a camera would deliver the frame.
                next_due += period
                if next_due < t1:
                    next_due = t1
                wait = next_due - time.perf_counter()
                if wait > 0 and self.stop.wait(wait):
                    break
                t1 = time.perf_counter()
            if after_gap:
                self.on_event("source_back", f"gap of {time.time() - last_frame_at:.1f} s without frames")
            last_frame_at = time.time()
            self.stats.frames += 1
            self.stats.read_ms.add(read_ms)
            frame = Frame(image, self.stats.frames, t1, read_ms, origin, after_gap)
            after_gap = False
            if not self.slot.put(frame):
                break
            if self.max_frames and self.stats.frames >= self.max_frames:
                break
        if reader is not None:
            reader.release()

