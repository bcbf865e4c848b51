"""The classifier lineside trains and exports: normalise -> backbone stages -> pool -> head.

Normalisation lives inside the network (buffers from the input spec), so the
model takes RGB values in 0..255 and every consumer only has to resize.
"""

from __future__ import annotations

import torch
from torch import nn

from lineside.spec import InputSpec


# How a head on tapped stages pools each stage: the average, or the average and the maximum
# (the default for taps: see README "Recipes").
POOLS = ("avg", "avgmax")
TAPS_POOL = "avgmax"


class Classifier(nn.Module):
    """`taps`: the stages whose pooled outputs, concatenated, feed the head. None is the
    last stage only (every recipe); middle stages describe textures better (see
    benchmarks/feature_taps.py) and are used by `linear` with --taps. Stages after the
    last tap are not run.

    `views`: orientations (ids of lineside.train.augment.orientations) whose pooled
    features are averaged before the head at prediction (test-time views): a model
    trained on flipped and turned copies then answers the same for every orientation of
    a part. Training reads single views through `embed`."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, spec: InputSpec,
                 dropout: float = 0.2, taps: tuple[int, ...] | None = None, views: tuple[int, ...] | None = None,
                 pool: str = "avg"):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pooling {pool!r}: expected one of {', '.join(POOLS)}")
        self.pool = pool
        self.views = tuple(int(k) for k in views) if views else None
        if self.views:
            if len(set(self.views)) != len(self.views) or not all(0 <= k < 8 for k in self.views):
                raise ValueError(f"test-time views {list(self.views)} must be distinct orientations 0..7")
            if spec.height != spec.width and any(k % 2 for k in self.views):
                raise ValueError(f"test-time views {list(self.views)}: quarter turns need a square input")
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.backbone = backbone
        self.taps = tuple(sorted(set(int(t) for t in taps))) if taps else None
        if self.taps:
            if self.taps[0] < 0 or self.taps[-1] >= len(self.stages):
                raise ValueError(f"taps {list(self.taps)} outside stages 0..{len(self.stages) - 1}")
            feature_dim = sum(stage_widths(backbone)[t] for t in self.taps) * (2 if pool == "avgmax" else 1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def stages(self) -> nn.ModuleList:
        return self.backbone.stages

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def trunk(self, x: torch.Tensor, stop: int) -> torch.Tensor:
        """Normalise and run stages [0, stop): the activations a frozen trunk hands on."""
        x = self.normalize(x)
        for stage in self.stages[:stop]:
            x = stage(x)
        return x

    def features(self, h: torch.Tensor, start: int) -> torch.Tensor:
        """Run stages [start, end) on trunk activations and pool to feature vectors
        (already pooled features pass through)."""
        if h.dim() == 2:
            return h
        if self.taps:
            if start != 0:
                raise ValueError("a model with taps trains its head only (strategy linear)")
            return self._tapped(h)
        for stage in self.stages[start:]:
            h = stage(h)
        return pool_map(h, "avg")

    def _tapped(self, h: torch.Tensor) -> torch.Tensor:
        pooled = []
        for i, stage in enumerate(self.stages[:self.taps[-1] + 1]):
            h = stage(h)
            if i in self.taps:
                pooled.append(pool_map(h, self.pool))
        return torch.cat(pooled, 1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W) float RGB in 0..255 -> the pooled features the head reads."""
        return self.features(self.normalize(x), 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W) float RGB in 0..255 -> logits (N, classes)."""
        if not self.views:
            return self.head(self.dropout(self.embed(x)))
        if torch.onnx.is_in_onnx_export():
            # One batch of all views: a single backbone in the exported graph.
            feats = self.embed(torch.cat([orient_tensor(x, k) for k in self.views]))
            return self.head(self.dropout(feats.reshape(len(self.views), -1, feats.shape[1]).mean(0)))
        # In PyTorch, one view at a time: the same result, and 1.2-1.5x faster on a
        # 2-core CPU than one batch four times larger.
        feats = sum(self.embed(orient_tensor(x, k)) for k in self.views) / len(self.views)
        return self.head(self.dropout(feats))


def pool_map(h: torch.Tensor, pool: str) -> torch.Tensor:
    """(N, C, H, W) -> (N, C) average, or (N, 2C) average then maximum ("avgmax"): the
    maximum keeps the strongest local response, which an average over the whole image
    dilutes when a defect is a small part of it."""
    avg = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(h, 1), 1)
    if pool == "avgmax":
        return torch.cat([avg, torch.amax(h, (2, 3))], 1)
    return avg


def orient_tensor(x: torch.Tensor, k: int) -> torch.Tensor:
    """Orientation k (r + 4 * f) of an (N, C, H, W) batch, as augment.orient does to one image."""
    r = k % 4   # written with transpose and flip, which export to ONNX (rot90 does not)
    if r == 1:
        x = x.flip(3).transpose(2, 3)
    elif r == 2:
        x = x.flip((2, 3))
    elif r == 3:
        x = x.transpose(2, 3).flip(3)
    return x.flip(3) if k >= 4 else x


def stage_widths(backbone: nn.Module) -> list[int]:
    """Channels out of each stage, from one small forward pass (BatchNorm statistics untouched)."""
    was_training = backbone.training
    backbone.eval()
    widths = []
    with torch.no_grad():
        param = next(backbone.parameters(), None)
        h = torch.zeros(1, 3, 64, 64, device=param.device if param is not None else None)
        for stage in backbone.stages:
            h = stage(h)
            widths.append(int(h.shape[1]))
    backbone.train(was_training)
    return widths


def resolve_taps(text: str, n_stages: int) -> tuple[int, ...] | None:
    """--taps: 'last' (None), 'mid' (from the middle stage up to the second-to-last), or
    stage numbers 'a,b,c' counted from 0."""
    if text in (None, "", "last"):
        return None
    if text == "mid":
        return tuple(range(n_stages // 2, n_stages - 1))
    try:
        taps = tuple(sorted({int(t) for t in str(text).split(",")}))
    except ValueError:
        taps = ()
    if not taps or taps[0] < 0 or taps[-1] >= n_stages:
        from lineside.errors import LinesideError

        raise LinesideError(f"--taps: '{text}' must be last, mid, or stage numbers between 0 and {n_stages - 1}")
    return taps
