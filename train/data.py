"""Images into tensors in the model's layout."""

from __future__ import annotations

import os

import numpy as np
import torch


LAYOUTS = ("channels_last", "nchw", "mixed")


def layout(device=None) -> str:
    """The memory layout of images and weights on `device` (default: the CPU): "nchw" on
    CUDA, "channels_last" (NHWC in memory) on the CPU. LINESIDE_CHANNELS_LAST=1 or 0 sets
    channels_last or NCHW everywhere, and =mixed channels_last with every depthwise
    convolution in NCHW. On CUDA PyTorch hands every channels_last depthwise convolution
    to cuDNN, which built its kernels at first use (cuDNN 9.19, H200, NEU at 224 px,
    `lineside train --strategy full`, 5 epochs, batch 32: a first step of 10 s, a first
    epoch 10.5x a later one, the command 25.1 s), while NCHW ones run PyTorch's own
    kernels (first step 0.9 s, first epoch 1.5x, command 13.6 s) at 0.88x channels_last's
    later epochs; at batch 128, 0.56x, which pays for its 12 s cold start only after some
    38 epochs of NEU's 1,440 training images. "mixed" keeps the other convolutions in
    channels_last and gives the depthwise ones to PyTorch's NCHW kernels, at the cost of
    a change of layout around each: whether that keeps channels_last's speed without its
    cold start is what benchmarks/gpu_train.py --layouts channels_last,nchw,mixed measures."""
    wanted = os.environ.get("LINESIDE_CHANNELS_LAST")
    if wanted in ("0", "1", "mixed"):
        return {"0": "nchw", "1": "channels_last", "mixed": "mixed"}[wanted]
    return "nchw" if torch.device(device or "cpu").type == "cuda" else "channels_last"


def memory_format(device=None) -> torch.memory_format:
    """The torch.memory_format of layout(device): what images, activations and weights are in."""
    return torch.contiguous_format if layout(device) == "nchw" else torch.channels_last


def in_layout(t: torch.Tensor) -> torch.Tensor:
    """An N x 3 x H x W tensor in memory_format() of its device; itself when it already is."""
    fmt = memory_format(t.device)
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


def place(module: torch.nn.Module, device) -> torch.nn.Module:
    """`module` on `device`, its weights in memory_format() of that device, and its
    depthwise convolutions in NCHW when layout(device) is "mixed"."""
    module = module.to(device).to(memory_format=memory_format(device))
    depthwise_in_nchw(module, layout(device) == "mixed")
    return module


_HOOKS = "_lineside_nchw_hooks"


def _to_nchw(conv, args):
    return (args[0].contiguous(), *args[1:])


def _to_channels_last(conv, args, out):
    return out.contiguous(memory_format=torch.channels_last)


def depthwise_in_nchw(module: torch.nn.Module, on: bool = True) -> torch.nn.Module:
    """Every depthwise convolution in `module` takes its input and weight in NCHW and
    hands its output on in channels_last (on=True), or runs in the module's layout again
    (on=False). Hooks and the weight's strides only: the weights and the state_dict are
    unchanged."""
    for m in module.modules():
        if not (isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels):
            continue
        for handle in getattr(m, _HOOKS, ()):
            handle.remove()
        hooks = ()
        if on:
            # A C x 1 x k x k weight is contiguous in both layouts; a clone gives it NCHW's strides.
            m.weight.data = m.weight.data.clone(memory_format=torch.contiguous_format)
            hooks = (m.register_forward_pre_hook(_to_nchw), m.register_forward_hook(_to_channels_last))
        setattr(m, _HOOKS, hooks)
    return module


def nchw(t: torch.Tensor) -> torch.Tensor:
    """An N x H x W x 3 uint8 tensor as the network's input: N x 3 x H x W float32
    (0..255) in memory_format() of its device (a permuted NHWC tensor is already channels_last)."""
    return in_layout(t.permute(0, 3, 1, 2).float())


def to_tensor(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """N x H x W x 3 uint8 numpy -> the network's input on `device` (nchw)."""
    return nchw(torch.from_numpy(np.ascontiguousarray(batch)).to(device, non_blocking=True))
