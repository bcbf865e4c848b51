"""Figures that eval writes with --out, drawn with OpenCV (no matplotlib: the runtime's
install scores bundles too): the confusion matrix, captioned thumbnails, and an HTML page
that shows them."""

from __future__ import annotations

import html
from pathlib import Path

import cv2
import numpy as np

from .files import write_atomic

THUMB = 192        # long side of a gallery image, pixels


def write_png(path: Path, bgr: np.ndarray) -> Path:
    ok, data = cv2.imencode(".png", bgr)
    if not ok:
        raise OSError(f"{path}: could not encode the image")
    write_atomic(Path(path), data.tobytes())
    return Path(path)


def confusion_image(cm: np.ndarray, labels, title: str) -> np.ndarray:
    """A BGR picture of the confusion matrix (rows: true class, columns: predicted), each
    cell shaded by its share of the row and labelled with its count."""
    cm = np.asarray(cm, dtype=np.int64)
    n = len(labels)
    cell = 56 if n <= 8 else 40
    names = [str(x)[:18] for x in labels]
    left = 14 + 8 * max(len(s) for s in names)
    top = 40 + 8 * max(len(s) for s in names)
    font = cv2.FONT_HERSHEY_SIMPLEX
    title = title[:90]
    footer = "true (rows) / predicted (columns)"
    text_w = max(cv2.getTextSize(title, font, 0.45, 1)[0][0] + 12,
                 left + cv2.getTextSize(footer, font, 0.4, 1)[0][0] + 12)
    w, h = max(left + n * cell + 12, text_w), top + n * cell + 30
    img = np.full((h, w, 3), 255, np.uint8)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, float), where=rows > 0)
    for i in range(n):
        for j in range(n):
            x, y = left + j * cell, top + i * cell
            shade = int(255 - 200 * share[i, j])
            colour = (255, shade, shade) if i == j else (shade, shade, 255)
            cv2.rectangle(img, (x, y), (x + cell - 2, y + cell - 2), colour, -1)
            text = str(cm[i, j])
            (tw, th), _ = cv2.getTextSize(text, font, 0.45, 1)
            cv2.putText(img, text, (x + (cell - tw) // 2, y + (cell + th) // 2), font, 0.45,
                        (255, 255, 255) if share[i, j] > 0.6 else (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, names[i], (6, top + i * cell + cell // 2 + 4), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    for j in range(n):   # the predicted classes' names, written upwards above their columns
        (tw, th), _ = cv2.getTextSize(names[j], font, 0.4, 1)
        label = np.full((th + 6, tw + 4, 3), 255, np.uint8)
        cv2.putText(label, names[j], (2, th + 2), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        label = cv2.rotate(label, cv2.ROTATE_90_COUNTERCLOCKWISE)
        x = left + j * cell + (cell - label.shape[1]) // 2
        y = top - 6 - label.shape[0]
        if y >= 0 and x + label.shape[1] <= w:
            img[y:y + label.shape[0], x:x + label.shape[1]] = label
    cv2.putText(img, footer, (left, h - 10), font, 0.4, (80, 80, 80), 1, cv2.LINE_AA)
    cv2.putText(img, title, (6, 16), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return img


def thumbnail(rgb: np.ndarray, caption: str) -> np.ndarray:
    """A BGR thumbnail (long side THUMB) with a caption bar under it."""
    h, w = rgb.shape[:2]
    s = THUMB / max(h, w)
    small = cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    bar = np.full((22, small.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, caption[:40], (3, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([cv2.cvtColor(small, cv2.COLOR_RGB2BGR), bar])


def gallery_page(path: Path, title: str, sections: list[tuple[str, list[tuple[str, str]]]]) -> Path:
    """An HTML page of image sections: (heading, [(file name, caption), ...])."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:1em}figure{display:inline-block;margin:4px}"
             "figcaption{font-size:12px;max-width:200px;word-break:break-all}</style>",
             f"<h1>{html.escape(title)}</h1>"]
    for heading, items in sections:
        parts.append(f"<h2>{html.escape(heading)} ({len(items)})</h2>")
        if not items:
            parts.append("<p>none</p>")
        for name, caption in items:
            parts.append(f"<figure><img src='{html.escape(name)}'><figcaption>{html.escape(caption)}</figcaption>"
                         "</figure>")
    write_atomic(Path(path), "\n".join(parts).encode("utf-8"))
    return Path(path)
