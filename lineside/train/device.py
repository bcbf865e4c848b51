"""Where PyTorch trains and scores: the one reading of --device."""

from __future__ import annotations

import torch

from lineside.errors import LinesideError


def pick_device(name: str | None) -> torch.device:
    """--device: auto or None (CUDA when PyTorch sees a GPU, else the CPU), cpu, cuda or
    cuda:N; OpenVINO's names CPU and GPU read as cpu and cuda. One-line errors name the
    option."""
    wanted = {"CPU": "cpu", "GPU": "cuda", "AUTO": "auto"}.get((name or "auto").upper(), (name or "").lower())
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if wanted != "cpu" and not wanted.startswith("cuda"):
        raise LinesideError(f"--device {name}: a training run scores in PyTorch, on cpu or cuda; "
                            f"export it (lineside export) for {name}")
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        raise LinesideError(f"--device {name}: no CUDA device is available (use --device cpu or auto)")
    try:
        return torch.device(wanted)
    except RuntimeError as exc:
        raise LinesideError(f"--device {name}: {exc}") from None
