"""Scoring a training run on labelled folders, and predicting single images (PyTorch,
or on the CPU the same network converted to OpenVINO in memory: see infer.py)."""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from lineside.errors import LinesideError
from lineside.scoring import evaluate, predict_paths

from . import trainer
from .checkpoint import load_checkpoint, resolve_checkpoint
from .data import place
from .trainer import score


def run_device(name: str | None) -> torch.device:
    """Where a training run scores: --device cpu or cuda[:N] (OpenVINO's CPU and GPU are
    read as these), or by default CUDA when present."""
    if name is None or name.upper() == "AUTO":
        return trainer.pick_device("auto")
    wanted = {"CPU": "cpu", "GPU": "cuda"}.get(name.upper(), name.lower())
    if wanted != "cpu" and not wanted.startswith("cuda"):
        raise LinesideError(f"--device {name}: a training run scores in PyTorch, on cpu or cuda; "
                            f"export it (lineside export) for {name}")
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        raise LinesideError(f"--device {name}: no CUDA device is available (use --device cpu)")
    try:
        return trainer.pick_device(wanted)
    except RuntimeError as exc:
        raise LinesideError(f"--device {name}: {exc}") from None


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
                      progress, reject_below=loaded.info.get("reject_below"))
    report["model"] = str(resolve_checkpoint(model_path))
    return report


def predict_files(model_path, paths, device: str | None = None) -> list[dict]:
    loaded = load_checkpoint(model_path)
    return predict_paths(RunScorer(loaded.model, run_device(device)), loaded.labels, loaded.spec, paths)
