"""Scoring a training run on labelled folders, and predicting single images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lineside.dataset import load_image_set
from lineside.errors import LinesideError
from lineside.images import is_image_file, read_image
from lineside.metrics import classification_report
from lineside.spec import resize_to_spec

from .checkpoint import load_checkpoint, resolve_checkpoint
from .data import load_images
from .trainer import predict_proba


def evaluate_run(model_path, data, skip_bad: bool = False, progress: bool = True) -> dict:
    loaded = load_checkpoint(model_path)
    images = load_image_set(data, classes=loaded.labels)
    x, images, bad = load_images(images, loaded.spec, skip_bad, progress, "reading images")
    probs = predict_proba(loaded.model, x, progress=progress)
    report = classification_report(images.targets, probs.argmax(1), loaded.labels)
    pred = probs.argmax(1)
    report["misclassified"] = [
        {"path": str(p), "true": loaded.labels[t], "predicted": loaded.labels[int(q)], "confidence": float(c)}
        for p, t, q, c in zip(images.paths, images.targets, pred, probs.max(1)) if t != q
    ]
    report.update(model=str(resolve_checkpoint(model_path)), data=str(data), skipped_images=bad)
    return report


def expand_images(paths) -> list[Path]:
    """Image files as given; a folder stands for the images in it (sorted, recursive)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and is_image_file(q))
            if not found:
                raise LinesideError(f"{p}: folder holds no images")
            out += found
        else:
            out.append(p)
    return out


def predict_files(model_path, paths) -> list[dict]:
    """Label and every class probability for each image (a bad file raises, naming it)."""
    loaded = load_checkpoint(model_path)
    paths = expand_images(paths)
    x = np.stack([resize_to_spec(read_image(p), loaded.spec) for p in paths])
    probs = predict_proba(loaded.model, x)
    return [
        {"path": str(Path(p)), "label": loaded.labels[int(row.argmax())], "confidence": float(row.max()),
         "probabilities": {name: float(v) for name, v in zip(loaded.labels, row)}}
        for p, row in zip(paths, probs)
    ]
