"""A synthetic parts dataset drawn with OpenCV, for the demo and the fast tests.

Five classes in the spirit of the classic parts-sorting example: hat, cube,
card, torch (a flashlight) and screw. Every image draws its part with a random
pose, scale, shade, lighting gradient, background texture and sensor noise, so a
classifier has to learn shapes, not pixels. The same seed gives the same images.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from .errors import LinesideError

CLASSES = ("card", "cube", "hat", "screw", "torch")


def _place(points, center, angle, scale):
    """Rotate/scale shape points (in a unit frame around 0,0) and move them to center."""
    c, s = math.cos(angle), math.sin(angle)
    pts = np.asarray(points, dtype=np.float64) * scale
    rot = np.stack([pts[:, 0] * c - pts[:, 1] * s, pts[:, 0] * s + pts[:, 1] * c], axis=1)
    return np.round(rot + center).astype(np.int32)


def _ellipse(cx, cy, ax, ay, start=0, end=360):
    return cv2.ellipse2Poly((0, 0), (int(ax * 100), int(ay * 100)), 0, start, end, 5).astype(np.float64) / 100 + (cx, cy)


def _rect(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _shape_polys(name: str, rng) -> list[tuple[np.ndarray, float]]:
    """Polygons (unit frame, ~[-1, 1]) and their relative shade for one part."""
    if name == "hat":
        brim = _ellipse(0, 0.35, 1.0, 0.22 + rng.uniform(-0.05, 0.05))
        crown = np.vstack([_ellipse(0, -0.25, 0.55, 0.55, 180, 360), _rect(-0.55, -0.25, 0.55, 0.35)[[1, 2, 3, 0]][1:3]])
        band = _rect(-0.55, 0.1, 0.55, 0.25)
        return [(brim, 0.8), (crown, 1.0), (band, 0.45)]
    if name == "cube":
        d = rng.uniform(0.35, 0.5)
        front = _rect(-0.6, -0.3, 0.3, 0.6)
        top = np.array([[-0.6, -0.3], [-0.6 + d, -0.3 - d], [0.3 + d, -0.3 - d], [0.3, -0.3]])
        side = np.array([[0.3, -0.3], [0.3 + d, -0.3 - d], [0.3 + d, 0.6 - d], [0.3, 0.6]])
        return [(front, 1.0), (top, 1.35), (side, 0.65)]
    if name == "card":
        w, h = 1.0, 0.62
        body = _rect(-w, -h, w, h)
        stripe = _rect(-w, -h + 0.2, w, -h + 0.42)
        chip = _rect(-0.7, 0.0, -0.35, 0.3)
        return [(body, 1.0), (stripe, 0.35), (chip, 1.45)]
    if name == "torch":
        body = _rect(-1.0, -0.16, 0.35, 0.16)
        head = np.array([[0.35, -0.16], [0.75, -0.32], [0.75, 0.32], [0.35, 0.16]])
        lens = _rect(0.75, -0.32, 0.85, 0.32)
        switch = _rect(-0.3, -0.24, -0.1, -0.16)
        return [(body, 1.0), (head, 0.8), (lens, 1.6), (switch, 0.4)]
    if name == "screw":
        head = _rect(-1.0, -0.3, -0.7, 0.3)
        shaft = np.array([[-0.7, -0.12], [0.8, -0.12], [1.0, 0.0], [0.8, 0.12], [-0.7, 0.12]])
        parts = [(head, 0.8), (shaft, 1.0)]
        for x in np.arange(-0.6, 0.8, 0.14):
            parts.append((np.array([[x, -0.14], [x + 0.05, -0.14], [x + 0.1, 0.14], [x + 0.05, 0.14]]), 0.55))
        return parts
    raise LinesideError(f"unknown synthetic class '{name}' (choose from {', '.join(CLASSES)})")


def _background(size: int, rng) -> np.ndarray:
    base = rng.uniform(40, 200)
    texture = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), rng.uniform(2, 8))
    texture *= rng.uniform(5, 25) / (texture.std() + 1e-6)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    gx, gy = rng.uniform(-40, 40, 2)
    img = base + texture + gx * (xx - 0.5) + gy * (yy - 0.5)
    tint = rng.uniform(0.85, 1.15, 3)
    return np.clip(img[:, :, None] * tint[None, None, :], 0, 255).astype(np.float32)


def draw_part(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One HxWx3 uint8 RGB image of a part of class `name`."""
    img = _background(size, rng)
    layer = np.zeros((size, size, 3), np.float32)
    mask = np.zeros((size, size), np.uint8)
    angle = rng.uniform(0, 2 * math.pi)
    scale = size * rng.uniform(0.28, 0.4)
    center = size / 2 + rng.uniform(-0.12, 0.12, 2) * size
    colour = rng.uniform(60, 230, 3)
    if abs(colour.mean() - img.mean()) < 40:  # keep the part visible against its background
        colour = np.clip(colour + (80 if img.mean() < 128 else -80), 0, 255)
    for poly, shade in _shape_polys(name, rng):
        pts = _place(poly, center, angle, scale)
        cv2.fillPoly(layer, [pts], tuple(float(v) for v in np.clip(colour * shade, 0, 255)), cv2.LINE_AA)
        cv2.fillPoly(mask, [pts], 255, cv2.LINE_AA)
    alpha = (mask.astype(np.float32) / 255.0)[:, :, None]
    img = img * (1 - alpha) + layer * alpha
    light = rng.uniform(0.75, 1.25)
    img = img * light + rng.normal(0, rng.uniform(2, 8), img.shape)
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.2))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_dataset(out, per_class: int = 40, size: int = 128, seed: int = 0, classes=CLASSES,
                  progress: bool = False) -> dict[str, int]:
    """Write `per_class` PNG images for each class under out/<class>/. Returns counts."""
    if per_class < 1:
        raise LinesideError("--per-class must be at least 1")
    if not 32 <= size <= 1024:
        raise LinesideError("--size must be between 32 and 1024")
    out = Path(out)
    counts = {}
    for ci, name in enumerate(classes):
        _shape_polys(name, np.random.default_rng(0))  # validate the name before writing anything
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, ci])
        for i in range(per_class):
            image = draw_part(name, size, rng)
            path = folder / f"{name}_{i:04d}.png"
            if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
                raise LinesideError(f"{path}: could not write image")
        counts[name] = per_class
    return counts


DEFECTS = ("scratch", "spot")


def draw_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A copy of a part image with one defect drawn near its middle, where the part is:
    a scratch (a thin line, darker or lighter than what it crosses) or a spot (a small
    blob)."""
    img = image.astype(np.float32).copy()
    size = img.shape[0]
    c = size / 2 + rng.uniform(-0.08, 0.08, 2) * size
    shade = 0.0 if img.mean() > 110 else 255.0
    colour = (shade, shade, shade)
    if kind == "scratch":
        angle = rng.uniform(0, math.pi)
        half = size * rng.uniform(0.15, 0.25)
        d = np.array([math.cos(angle), math.sin(angle)]) * half
        a, b = np.round(c - d).astype(int), np.round(c + d).astype(int)
        cv2.line(img, tuple(int(v) for v in a), tuple(int(v) for v in b), colour, max(2, size // 40), cv2.LINE_AA)
    elif kind == "spot":
        cv2.circle(img, tuple(int(v) for v in np.round(c)), max(3, int(size * rng.uniform(0.06, 0.09))), colour,
                   -1, cv2.LINE_AA)
    else:
        raise LinesideError(f"defect '{kind}': choose from {', '.join(DEFECTS)}")
    return np.clip(img, 0, 255).astype(np.uint8)


def write_anomaly_dataset(out, part: str = "card", good: int = 40, defective: int = 10, size: int = 128,
                          seed: int = 0) -> dict[str, int]:
    """An inspection-from-good-parts dataset: out/good/ holds `good` images of one part,
    out/scratch/ and out/spot/ `defective` images each of the same part with a defect."""
    if good < 0 or defective < 0 or good + defective < 1:
        raise LinesideError("--per-class must be at least 1")
    if not 32 <= size <= 1024:
        raise LinesideError("--size must be between 32 and 1024")
    _shape_polys(part, np.random.default_rng(0))   # validate the name before writing anything
    out = Path(out)
    counts = {}
    for ci, (folder, n) in enumerate((("good", good),) + tuple((d, defective) for d in DEFECTS)):
        if n == 0:
            continue
        (out / folder).mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, 100 + ci])
        for i in range(n):
            image = draw_part(part, size, rng)
            if folder != "good":
                image = draw_defect(image, folder, rng)
            path = out / folder / f"{folder}_{i:04d}.png"
            if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
                raise LinesideError(f"{path}: could not write image")
        counts[folder] = n
    return counts
