"""Anomaly maps drawn over the part: torch-free, for predict, eval's gallery and the box.

The map an anomaly model gives is divided by its threshold, so 1.0 means "as unusual as
the threshold allows": colours run from blue (0) through green to red (2 and above), and
the region at or above 1.0 is outlined.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .files import write_atomic

ALPHA = 0.45      # weight of the colours over the image
TOP = 2.0         # map value drawn in full red (twice the threshold)


def overlay(rgb: np.ndarray, amap: np.ndarray, label: str | None = None) -> np.ndarray:
    """uint8 RGB image (H, W, 3) and its map (h, w) -> uint8 BGR image (H, W, 3), ready
    for cv2.imwrite: the map resized to the image, coloured and blended, its region above
    the threshold outlined in white, `label` written in the corner."""
    h, w = rgb.shape[:2]
    m = cv2.resize(np.nan_to_num(np.asarray(amap, np.float32), nan=0.0, posinf=TOP, neginf=0.0), (w, h),
                   interpolation=cv2.INTER_LINEAR)
    levels = np.clip(m / TOP * 255.0, 0, 255).astype(np.uint8)
    colours = cv2.applyColorMap(levels, cv2.COLORMAP_JET)
    bgr = cv2.cvtColor(np.ascontiguousarray(rgb, np.uint8), cv2.COLOR_RGB2BGR)
    out = cv2.addWeighted(bgr, 1.0 - ALPHA, colours, ALPHA, 0.0)
    above = (m >= 1.0).astype(np.uint8)
    if above.any():
        contours, _ = cv2.findContours(above, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (255, 255, 255), max(1, round(min(h, w) / 200)))
    if label:
        scale = max(0.4, min(h, w) / 400)
        cv2.putText(out, label, (4, int(18 * scale) + 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale, (0, 0, 0),
                    max(2, int(3 * scale)), cv2.LINE_AA)
        cv2.putText(out, label, (4, int(18 * scale) + 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale,
                    (255, 255, 255), max(1, int(scale)), cv2.LINE_AA)
    return out


def write_overlay(path: Path, rgb: np.ndarray, amap: np.ndarray, label: str | None = None) -> Path:
    """overlay() written as a PNG, atomically."""
    ok, data = cv2.imencode(".png", overlay(rgb, amap, label))
    if not ok:
        raise OSError(f"{path}: could not encode the overlay")
    write_atomic(Path(path), data.tobytes())
    return Path(path)
