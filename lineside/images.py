"""Reading images from disk into HxWx3 uint8 RGB arrays, with errors that name the file.

Every image lineside decodes (datasets, predict, folder sources, the review page) is
sized from its header first and refused when it has more pixels than the limit: a
875 KB PNG can hold 30000x30000 pixels and would take gigabytes and tens of seconds
to decode. The limit is MAX_IMAGE_PIXELS (64 megapixels, about 200 MB decoded), or
the environment variable LINESIDE_MAX_IMAGE_PIXELS. Content whose header is none of
the formats lineside reads (PNG, JPEG, BMP, TIFF, WebP, PNM) is refused, whatever
the file's name, so that nothing is decoded unsized.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import cv2
import numpy as np

from .errors import LinesideError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
MAX_IMAGE_BYTES = 256 * 1024 * 1024
MAX_IMAGE_PIXELS = 64_000_000
PIXELS_ENV = "LINESIDE_MAX_IMAGE_PIXELS"


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


def max_pixels() -> int:
    """The pixel limit in force: LINESIDE_MAX_IMAGE_PIXELS if set, else MAX_IMAGE_PIXELS."""
    text = os.environ.get(PIXELS_ENV, "").strip()
    if not text:
        return MAX_IMAGE_PIXELS
    try:
        value = int(float(text))
    except ValueError:
        raise LinesideError(f"{PIXELS_ENV}={text!r}: not a number of pixels") from None
    if value < 1:
        raise LinesideError(f"{PIXELS_ENV}={text!r}: must be positive")
    return value


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of a PNG, JPEG, BMP, TIFF, WebP or PNM image, without
    decoding it; None when the header is none of these or does not say."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if data[:2] == b"\xff\xd8":
            return _jpeg_size(data)
        if data[:2] == b"BM":
            header = struct.unpack("<I", data[14:18])[0]
            if header == 12:                          # OS/2 BITMAPCOREHEADER
                return struct.unpack("<HH", data[18:22])
            w, h = struct.unpack("<ii", data[18:26])
            return abs(w), abs(h)
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_size(data)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp_size(data)
        if re.match(rb"P[1-7]\s", data[:3]):
            return _pnm_size(data)
    except (struct.error, IndexError, ValueError):
        return None
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:                  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):
            i += 2
            continue
        if marker in (0xD9, 0xDA):          # end of image, start of scan: no frame header came
            return None
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return (w, h) if w and h else None
        i += 2 + length
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    end = "<" if data[:2] == b"II" else ">"
    (offset,) = struct.unpack(end + "I", data[4:8])
    (count,) = struct.unpack(end + "H", data[offset:offset + 2])
    found = {}
    for k in range(count):
        entry = data[offset + 2 + 12 * k: offset + 14 + 12 * k]
        tag, kind = struct.unpack(end + "HH", entry[:4])
        if tag in (256, 257):
            found[tag] = struct.unpack(end + ("H" if kind == 3 else "I"), entry[8:10] if kind == 3 else entry[8:12])[0]
    return (found[256], found[257]) if len(found) == 2 else None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 ":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    return None


def _pnm_size(data: bytes) -> tuple[int, int] | None:
    head = re.sub(rb"#[^\n]*", b" ", data[:1024])
    if head[:2] == b"P7":                    # PAM: WIDTH and HEIGHT lines
        w, h = re.search(rb"WIDTH\s+(\d+)", head), re.search(rb"HEIGHT\s+(\d+)", head)
        return (int(w.group(1)), int(h.group(1))) if w and h else None
    fields = head[2:].split()
    return int(fields[0]), int(fields[1])


def check_pixels(data: bytes, where) -> tuple[int, int]:
    """The image's (width, height) from its header, or BadImage when it cannot be sized or
    has more pixels than max_pixels()."""
    size = image_size(data)
    if size is None:
        raise BadImage(where, "not a readable image (corrupt, or not PNG, JPEG, BMP, TIFF, WebP or PNM)")
    w, h = size
    limit = max_pixels()
    if w * h > limit:
        raise BadImage(where, f"{w}x{h} pixels is more than the limit of {limit:,} "
                              f"(raise it with {PIXELS_ENV} if such images are real)")
    return size


def decode_image(data: bytes, where, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    """Encoded image bytes -> the array OpenCV decodes, sized and limited first (check_pixels)."""
    check_pixels(data, where)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None or image.size == 0:
        raise BadImage(where, "not a readable image (corrupt or unsupported format)")
    return image


def read_image(path) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB. Grayscale becomes 3 channels.

    Raises BadImage, naming the file, when it is missing, empty, too large (in bytes or
    pixels, see check_pixels) or not decodable."""
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
        data = path.read_bytes()
    except OSError as exc:
        raise BadImage(path, f"cannot read ({exc.strerror or exc})") from exc
    image = decode_image(data, path)
    if image.ndim == 3 and image.shape[2] not in (1, 3, 4):
        raise BadImage(path, f"unsupported number of channels ({image.shape[2]})")
    return to_rgb(image)
