"""Evaluation and prediction around any `predict_proba(uint8 images) -> probabilities`:
a training run (PyTorch) and an exported model (ONNX Runtime / OpenVINO) report alike."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .dataset import load_arrays, load_image_set
from .errors import LinesideError
from .images import is_image_file, read_image
from .metrics import classification_report, confidence_report
from .spec import InputSpec, resize_to_spec

PredictFn = Callable[[np.ndarray], np.ndarray]
BATCH = 32


def predict_batched(predict: PredictFn, x: np.ndarray, progress: bool = False) -> np.ndarray:
    """predict over x in batches; a predict with a `whole(x, progress)` method (a training
    run: see lineside.train.evaluate) is handed all of x at once and batches itself."""
    from tqdm import tqdm

    whole = getattr(predict, "whole", None)
    if whole is not None:
        return whole(x, progress)
    out = [predict(x[s:s + BATCH]) for s in tqdm(range(0, len(x), BATCH), desc="predicting", unit="batch",
                                                 disable=not progress, leave=False)]
    return np.concatenate(out)


def evaluate(predict: PredictFn, labels, spec: InputSpec, data, skip_bad=False, progress=True,
             reject_below: float | None = None) -> dict:
    images = load_image_set(data, classes=list(labels))
    x, images, bad = load_arrays(images, spec, skip_bad, progress, "reading images")
    probs = predict_batched(predict, x, progress)
    pred = probs.argmax(1)
    report = classification_report(images.targets, pred, labels)
    report["misclassified"] = [
        {"path": str(p), "true": labels[t], "predicted": labels[int(q)], "confidence": float(c)}
        for p, t, q, c in zip(images.paths, images.targets, pred, probs.max(1)) if t != q
    ]
    report["confidence"] = confidence_report(probs, images.targets, reject_below)
    report.update(data=str(data), skipped_images=bad)
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


def predict_paths(predict: PredictFn, labels, spec: InputSpec, paths) -> list[dict]:
    """Label and every class probability for each image (a bad file raises, naming it)."""
    paths = expand_images(paths)
    x = np.stack([resize_to_spec(read_image(p), spec) for p in paths])
    probs = predict_batched(predict, x)
    return [
        {"path": str(p), "label": labels[int(row.argmax())], "confidence": float(row.max()),
         "probabilities": {name: float(v) for name, v in zip(labels, row)}}
        for p, row in zip(paths, probs)
    ]


def is_exported(path: Path) -> bool:
    return (path.is_dir() and (path / "bundle.json").is_file()) or path.name == "bundle.json" \
        or path.suffix in (".onnx", ".xml")


def open_scorer(model: Path, backend, precision, device, threads):
    """(predict_proba, labels, spec, description) for a run folder or an exported model.
    Exported models never import torch."""
    if is_exported(model):
        from lineside.runtime.model import open_model

        m = open_model(model, backend=backend, precision=precision, device=device or "CPU", threads=threads)
        # the model itself as the predictor: its whole() scores all the images at once
        return m, m.labels, m.spec, {"model": str(m.path), "backend": m.backend,
                                     "reject_below": m.metadata.reject_below}
    from lineside.train.checkpoint import load_checkpoint, resolve_checkpoint
    from lineside.train.evaluate import RunScorer, run_device

    where = run_device(device)
    loaded = load_checkpoint(model)
    return (RunScorer(loaded.model, where), loaded.labels, loaded.spec,
            {"model": str(resolve_checkpoint(model)), "backend": "pytorch", "device": where.type,
             "reject_below": loaded.info.get("reject_below")})
