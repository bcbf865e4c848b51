"""The classifier lineside trains and exports: normalise -> backbone stages -> pool -> head.

Normalisation lives inside the network (buffers from the input spec), so the
model takes RGB values in 0..255 and every consumer only has to resize.
"""

from __future__ import annotations

import torch
from torch import nn

from lineside.spec import InputSpec


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, spec: InputSpec,
                 dropout: float = 0.2):
        super().__init__()
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.backbone = backbone
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
        for stage in self.stages[start:]:
            h = stage(h)
        return torch.flatten(torch.nn.functional.adaptive_avg_pool2d(h, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W) float RGB in 0..255 -> logits (N, classes)."""
        return self.head(self.dropout(self.features(self.normalize(x), 0)))
