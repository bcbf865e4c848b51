"""Images into tensors in the model's layout."""

from __future__ import annotations

import os

import numpy as np
import torch


def memory_format() -> torch.memory_format:
    """The layout of images and weights: channels_last (NHWC in memory), or NCHW with
    LINESIDE_CHANNELS_LAST=0. On CUDA the two run different depthwise kernels:
    PyTorch hands every channels_last depthwise convolution to cuDNN, whose recent versions
    build its kernels at first use of each shape (reported as a cold start of about a
    second per plan from cuDNN 9.10), while NCHW float32 and bfloat16 depthwise
    convolutions run PyTorch's own kernels. benchmarks/gpu_train.py measures both."""
    if os.environ.get("LINESIDE_CHANNELS_LAST", "1") == "0":
        return torch.contiguous_format
    return torch.channels_last


def in_layout(t: torch.Tensor) -> torch.Tensor:
    """An N x 3 x H x W tensor in memory_format(); itself when it already is."""
    fmt = memory_format()
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


def place(module: torch.nn.Module, device) -> torch.nn.Module:
    """`module` on `device`, its weights in memory_format()."""
    return module.to(device).to(memory_format=memory_format())


def nchw(t: torch.Tensor) -> torch.Tensor:
    """An N x H x W x 3 uint8 tensor as the network's input: N x 3 x H x W float32
    (0..255) in memory_format() (a permuted NHWC tensor is already channels_last)."""
    return in_layout(t.permute(0, 3, 1, 2).float())


def to_tensor(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """N x H x W x 3 uint8 numpy -> the network's input on `device` (nchw)."""
    return nchw(torch.from_numpy(np.ascontiguousarray(batch)).to(device, non_blocking=True))
