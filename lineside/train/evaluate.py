"""Scoring a training run on labelled folders, and predicting single images (PyTorch,
or on the CPU the same network converted to OpenVINO in memory: see infer.py)."""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from lineside.scoring import evaluate, predict_paths

from .checkpoint import load_checkpoint, resolve_checkpoint
from .data import place
from .device import pick_device as run_device  # tests stand a CUDA device in here
from .trainer import score


class RunScorer:
    """A run's model as a `predict(images) -> probabilities` for lineside.scoring, on
    `device` (by default CUDA when present)."""

    def __init__(self, model, device: torch.device | None = None):
        device = device or run_device(None)
        self.model = place(model, device)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return score(self.model, x)

    def whole(self, x: np.ndarray, progress: bool = False) -> np.ndarray:
        with tqdm(total=len(x), desc="predicting", unit="img", disable=not progress, leave=False) as bar:
            return score(self.model, x, progress=bar.update)


def evaluate_run(model_path, data, skip_bad: bool = False, progress: bool = True,
                 device: str | None = None) -> dict:
    loaded = load_checkpoint(model_path)
    report = evaluate(RunScorer(loaded.model, run_device(device)), loaded.labels, loaded.spec, data, skip_bad,
                      progress, reject_below=loaded.trained.reject_below)
    report["model"] = str(resolve_checkpoint(model_path))
    return report


def predict_files(model_path, paths, device: str | None = None) -> list[dict]:
    loaded = load_checkpoint(model_path)
    return predict_paths(RunScorer(loaded.model, run_device(device)), loaded.labels, loaded.spec, paths)
