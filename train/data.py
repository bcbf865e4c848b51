"""Images into tensors in the model's layout."""

from __future__ import annotations

import os

import numpy as np
import torch


def memory_format(device=None) -> torch.memory_format:
    """The layout of images and weights on `device` (default: the CPU): NCHW on CUDA,
    channels_last (NHWC in memory) on the CPU; LINESIDE_CHANNELS_LAST=1 or 0 sets it
    everywhere. On CUDA PyTorch hands every channels_last depthwise convolution to cuDNN,
    which built its kernels at first use (cuDNN 9.19, H200, NEU at 224 px, `lineside
    train --strategy full`, 5 epochs, batch 32: a first step of 10 s, a first epoch 10.5x a
    later one, the command 25.1 s), while NCHW ones run PyTorch's own kernels (first step
    0.9 s, first epoch 1.5x, command 13.6 s) at 0.88x channels_last's later epochs; at
    batch 128, 0.56x, which pays for its 12 s cold start only after some 38 epochs of
    NEU's 1,440 training images. benchmarks/gpu_train.py --layouts measures both."""
    wanted = os.environ.get("LINESIDE_CHANNELS_LAST")
    if wanted in ("0", "1"):
        return torch.channels_last if wanted == "1" else torch.contiguous_format
    return torch.contiguous_format if torch.device(device or "cpu").type == "cuda" else torch.channels_last


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
