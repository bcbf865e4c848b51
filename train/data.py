"""Images into tensors in the model's layout."""

from __future__ import annotations

import numpy as np
import torch



def to_tensor(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """N x H x W x 3 uint8 -> N x 3 x H x W float32 (0..255), channels_last in memory."""
    t = torch.from_numpy(np.ascontiguousarray(batch)).to(device, non_blocking=True)
    return t.permute(0, 3, 1, 2).float()  # a permuted NHWC tensor is already channels_last
