"""Images into tensors in the model's layout."""

from __future__ import annotations

import os

import numpy as np
import torch


def layout(device=None) -> str:
    """The memory layout of images and weights on `device` (default: the CPU): "nchw" on
    CUDA, "channels_last" (NHWC in memory) on the CPU; LINESIDE_CHANNELS_LAST=1 or 0 sets
    channels_last or NCHW everywhere. On CUDA PyTorch hands every channels_last depthwise
    convolution to cuDNN, which builds its kernels at first use, in every process (cuDNN
    9.19, H200, 1,800 images at 224 px, `lineside train --strategy full`, 5 epochs: a
    first step of 9 s and a command of 19-21 s, against 1 s and 11 s in NCHW, whose
    depthwise convolutions run PyTorch's own kernels). Once warm channels_last steps 1.8x
    faster at batch 128 and about as fast at batch 32: it pays for its cold start (8 s in
    the first epoch, 2.5 s more in calibration) only after some 50,000 training images at
    batch 128, 34 epochs of NEU's 1,440. Channels_last with the depthwise convolutions
    alone in NCHW was measured too: as slow as NCHW (2,118 against 2,075 img/s at batch
    128), so the speed is cuDNN's depthwise kernels'."""
    wanted = os.environ.get("LINESIDE_CHANNELS_LAST")
    if wanted in ("0", "1"):
        return "nchw" if wanted == "0" else "channels_last"
    return "nchw" if torch.device(device or "cpu").type == "cuda" else "channels_last"


def memory_format(device=None) -> torch.memory_format:
    """The torch.memory_format of layout(device): what images, activations and weights are in."""
    return torch.contiguous_format if layout(device) == "nchw" else torch.channels_last


def in_layout(t: torch.Tensor) -> torch.Tensor:
    """An N x 3 x H x W tensor in memory_format() of its device; itself when it already is."""
    fmt = memory_format(t.device)
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


def place(module: torch.nn.Module, device) -> torch.nn.Module:
    """`module` on `device`, its weights in memory_format() of that device."""
    return module.to(device).to(memory_format=memory_format(device))


def nchw(t: torch.Tensor) -> torch.Tensor:
    """An N x H x W x 3 uint8 tensor as the network's input: N x 3 x H x W float32
    (0..255) in memory_format() of its device (a permuted NHWC tensor is already channels_last)."""
    return in_layout(t.permute(0, 3, 1, 2).float())


def to_tensor(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """N x H x W x 3 uint8 numpy -> the network's input on `device` (nchw)."""
    return nchw(torch.from_numpy(np.ascontiguousarray(batch)).to(device, non_blocking=True))
