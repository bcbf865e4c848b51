"""Images into memory at the model's size, and into tensors in the model's layout."""

from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm import tqdm

from lineside.dataset import ImageSet
from lineside.errors import LinesideError
from lineside.images import BadImage, read_image
from lineside.spec import InputSpec, resize_to_spec

log = logging.getLogger(__name__)


def load_images(images: ImageSet, spec: InputSpec, skip_bad: bool = False, progress: bool = True,
                desc: str = "reading images"):
    """Read and resize every image -> (uint8 array N x H x W x 3, kept ImageSet, bad paths).

    A bad image is an error naming the file unless skip_bad, which warns and counts."""
    arrays, keep, bad = [], [], []
    for i, path in enumerate(tqdm(images.paths, desc=desc, unit="img", disable=not progress, leave=False)):
        try:
            arrays.append(resize_to_spec(read_image(path), spec))
            keep.append(i)
        except BadImage as exc:
            if not skip_bad:
                raise LinesideError(f"{exc} (pass --skip-bad to skip unreadable images)") from exc
            log.warning("skipping %s", exc)
            bad.append(str(path))
    if not arrays:
        raise LinesideError(f"{images.root}: no readable images")
    return np.stack(arrays), images.subset(keep), bad


def to_tensor(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """N x H x W x 3 uint8 -> N x 3 x H x W float32 (0..255), channels_last in memory."""
    t = torch.from_numpy(np.ascontiguousarray(batch)).to(device, non_blocking=True)
    return t.permute(0, 3, 1, 2).float()  # a permuted NHWC tensor is already channels_last
