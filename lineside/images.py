"""Reading images from disk into HxWx3 uint8 RGB arrays, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .errors import LinesideError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
MAX_IMAGE_BYTES = 256 * 1024 * 1024


class BadImage(LinesideError):
    """An image file that cannot be used; the message names it."""

    def __init__(self, path, why: str):
        super().__init__(f"{path}: {why}")
        self.path = Path(path)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Any decoded OpenCV image (gray, BGR, BGRA, 16-bit) -> HxWx3 uint8 RGB."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    if image.shape[2] == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_image(path) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB. Grayscale becomes 3 channels.

    Raises BadImage, naming the file, when it is missing, empty, too large or
    not decodable."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BadImage(path, f"cannot open ({exc.strerror or exc})") from exc
    if size == 0:
        raise BadImage(path, "file is empty")
    if size > MAX_IMAGE_BYTES:
        raise BadImage(path, f"file is {size / 2**20:.0f} MiB, larger than the {MAX_IMAGE_BYTES // 2**20} MiB limit")
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise BadImage(path, f"cannot read ({exc})") from exc
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise BadImage(path, "not a readable image (corrupt or unsupported format)")
    if image.ndim == 3 and image.shape[2] not in (1, 3, 4):
        raise BadImage(path, f"unsupported number of channels ({image.shape[2]})")
    return to_rgb(image)
