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


def tradeoff_image(rows: list[dict], parts: tuple[int, int], best: dict, title: str) -> np.ndarray:
    """lineside score --plot: escapes (defective parts called OK) against false calls (good
    parts called NG) for every --reject-below, one line per --vote, the best setting ringed.
    `parts`: (good parts, defective parts), for the axes in percent."""
    good, bad = max(parts[0], 1), max(parts[1], 1)
    w, h, left, top, right, bottom = 640, 440, 64, 36, 150, 48
    img = np.full((h, w, 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    xs = [100.0 * r["false_calls"] / good for r in rows]
    ys = [100.0 * r["escapes"] / bad for r in rows]
    xmax, ymax = max(max(xs, default=0), 1.0) * 1.1, max(max(ys, default=0), 1.0) * 1.1
    pw, ph = w - left - right, h - top - bottom

    def at(x, y):
        return int(left + pw * x / xmax), int(top + ph - ph * y / ymax)

    cv2.rectangle(img, (left, top), (left + pw, top + ph), (160, 160, 160), 1)
    for k in range(5):
        fx, fy = xmax * k / 4, ymax * k / 4
        cv2.putText(img, f"{fx:.1f}", (at(fx, 0)[0] - 10, top + ph + 16), font, 0.35, (80, 80, 80), 1, cv2.LINE_AA)
        cv2.putText(img, f"{fy:.1f}", (left - 40, at(0, fy)[1] + 4), font, 0.35, (80, 80, 80), 1, cv2.LINE_AA)
    colours = [(180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148), (75, 86, 140)]
    votes = sorted({r["vote"] for r in rows}, key=lambda v: [int(n) for n in v.split("/")])
    for i, vote in enumerate(votes):
        colour = colours[i % len(colours)]
        pts = sorted(at(x, y) for x, y, r in zip(xs, ys, rows) if r["vote"] == vote)
        for p, q in zip(pts, pts[1:]):
            cv2.line(img, p, q, colour, 1, cv2.LINE_AA)
        for p in pts:
            cv2.circle(img, p, 3, colour, -1, cv2.LINE_AA)
        cv2.putText(img, f"vote {vote}", (left + pw + 12, top + 16 + 18 * i), font, 0.45, colour, 1, cv2.LINE_AA)
    bx, by = at(100.0 * best["false_calls"] / good, 100.0 * best["escapes"] / bad)
    cv2.circle(img, (bx, by), 9, (0, 0, 0), 1, cv2.LINE_AA)
    rb = "none" if best["reject_below"] is None else f"{best['reject_below']:.2f}"
    cv2.putText(img, f"best: {rb}, {best['vote']}", (left + pw + 12, top + 16 + 18 * (len(votes) + 1)), font, 0.4,
                (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "false calls (% of good parts called NG)", (left, h - 12), font, 0.45, (0, 0, 0), 1,
                cv2.LINE_AA)
    cv2.putText(img, title[:80], (6, 20), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    label = np.full((18, ph, 3), 255, np.uint8)
    cv2.putText(label, "escapes (% of defective parts called OK)"[:60], (4, 13), font, 0.4, (0, 0, 0), 1,
                cv2.LINE_AA)
    img[top:top + ph, 4:22] = cv2.rotate(label, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return img
