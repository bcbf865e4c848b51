"""Scoring a training run on labelled folders, and predicting single images (PyTorch)."""

from __future__ import annotations

from functools import partial

from lineside.scoring import evaluate, predict_paths

from .checkpoint import load_checkpoint, resolve_checkpoint
from .trainer import predict_proba


def evaluate_run(model_path, data, skip_bad: bool = False, progress: bool = True) -> dict:
    loaded = load_checkpoint(model_path)
    report = evaluate(partial(predict_proba, loaded.model), loaded.labels, loaded.spec, data, skip_bad, progress)
    report["model"] = str(resolve_checkpoint(model_path))
    return report


def predict_files(model_path, paths) -> list[dict]:
    loaded = load_checkpoint(model_path)
    return predict_paths(partial(predict_proba, loaded.model), loaded.labels, loaded.spec, paths)
