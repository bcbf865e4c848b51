"""Videos for trying and benchmarking the camera loop: labelled images laid out as
conveyor frames (640x480, 30 fps by default), one part per frame or held for a few."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .dataset import load_image_set
from .errors import LinesideError
from .images import read_image

CODECS = {".mp4": "mp4v", ".avi": "MJPG", ".mkv": "mp4v"}


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise LinesideError(f"--size: '{text}' is not WIDTHxHEIGHT (for example 640x480)") from None
    if not (16 <= w <= 7680 and 16 <= h <= 4320):
        raise LinesideError(f"--size: {w}x{h} is outside 16x16..7680x4320")
    return w, h


def placement(image_hw: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """x, y, w, h of an image of (height, width) centred on a frame of `size`, scaled to fit."""
    w, h = size
    scale = min(w / image_hw[1], h / image_hw[0])
    iw, ih = max(1, round(image_hw[1] * scale)), max(1, round(image_hw[0] * scale))
    return (w - iw) // 2, (h - ih) // 2, iw, ih


def frame_from_image(image_rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The image centred on a neutral grey frame, scaled to fit (BGR, as cameras deliver)."""
    w, h = size
    x, y, iw, ih = placement(image_rgb.shape[:2], size)
    frame = np.full((h, w, 3), 96, np.uint8)
    frame[y:y + ih, x:x + iw] = cv2.resize(image_rgb, (iw, ih), interpolation=cv2.INTER_LINEAR)[:, :, ::-1]
    return frame


def write_video(data, out: Path, size=(640, 480), fps: float = 30.0, hold: int = 1, shuffle_seed: int | None = 0,
                limit: int | None = None, noise: float = 2.0) -> dict:
    """Write the images of a labelled folder (or a folder of images) as a video; returns
    the number of frames and the label of each part in order. `noise` (grey levels) is
    sensor noise, so that a part held for several frames looks as it would from a camera
    rather than as repeated identical (frozen) frames."""
    out = Path(out)
    codec = CODECS.get(out.suffix.lower())
    if codec is None:
        raise LinesideError(f"{out}: video must end in {', '.join(CODECS)}")
    if hold < 1 or fps <= 0:
        raise LinesideError("--hold must be at least 1 and --fps positive")
    images = load_image_set(data)
    order = np.arange(len(images.paths))
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(order)
    if limit:
        order = order[:limit]
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*codec), fps, size)
    if not writer.isOpened():
        raise LinesideError(f"{out}: OpenCV cannot write this video (codec {codec})")
    parts = []
    box = None     # the union of the parts' places: the region of interest for lineside run
    rng = np.random.default_rng(shuffle_seed)
    try:
        for i in order:
            image = read_image(images.paths[i])
            x, y, iw, ih = placement(image.shape[:2], size)
            box = (x, y, x + iw, y + ih) if box is None else (min(box[0], x), min(box[1], y), max(box[2], x + iw),
                                                              max(box[3], y + ih))
            frame = frame_from_image(image, size)
            for _ in range(hold):
                if noise > 0:
                    jitter = rng.normal(0, noise, frame.shape).astype(np.float32)
                    writer.write(np.clip(frame + jitter, 0, 255).astype(np.uint8))
                else:
                    writer.write(frame)
            parts.append(images.classes[images.targets[i]])
    finally:
        writer.release()
    roi = None if box is None else [box[0], box[1], box[2] - box[0], box[3] - box[1]]
    return {"path": str(out), "frames": len(parts) * hold, "parts": len(parts), "fps": fps,
            "size": list(size), "roi": roi, "labels": parts}
