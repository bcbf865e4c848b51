"""Augmentation for inspection images, on uint8 RGB arrays already at the model's size.

Flips and 90-degree rotations are on by default (most surface defects have no
preferred orientation) and can be switched off where orientation matters, e.g.
a part that must not be mounted upside down.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class AugmentConfig:
    flip: bool = True
    rot90: bool = True
    affine: float = 1.0  # strength of rotation/scale/shift jitter (0 = off)
    color: float = 1.0  # strength of brightness/contrast jitter (0 = off)
    blur: float = 0.2  # probability of a slight gaussian blur
    noise: float = 0.2  # probability of sensor-like gaussian noise


class Augmenter:
    def __init__(self, cfg: AugmentConfig, seed: int):
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        cfg, rng = self.cfg, self.rng
        out = image
        if cfg.flip:
            if rng.random() < 0.5:
                out = out[:, ::-1]
            if rng.random() < 0.5:
                out = out[::-1]
        if cfg.rot90:
            out = np.rot90(out, int(rng.integers(4)))
        out = np.ascontiguousarray(out)
        if cfg.affine > 0 and rng.random() < 0.7:
            out = self._affine(out)
        if cfg.color > 0 and rng.random() < 0.8:
            alpha = 1.0 + rng.uniform(-0.2, 0.2) * cfg.color  # contrast
            beta = rng.uniform(-20, 20) * cfg.color  # brightness, grey levels
            out = cv2.convertScaleAbs(out, alpha=alpha, beta=beta)
        if rng.random() < cfg.blur:
            out = cv2.GaussianBlur(out, (0, 0), sigmaX=rng.uniform(0.3, 1.0))
        if rng.random() < cfg.noise:
            noise = rng.normal(0.0, rng.uniform(2.0, 6.0), out.shape)
            out = np.clip(out.astype(np.float32) + noise, 0, 255).astype(np.uint8)
        return out

    def _affine(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        s = self.cfg.affine
        angle = self.rng.uniform(-10, 10) * s
        scale = 1.0 + self.rng.uniform(-0.1, 0.1) * s
        m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
        m[:, 2] += self.rng.uniform(-0.05, 0.05, 2) * (w, h) * s
        return cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


# -- flips and quarter turns as a group ---------------------------------------------
# An orientation is an id k = r + 4 * f: r quarter turns (np.rot90), then a left-right
# mirror when f. The ids allowed by --flip/--rot90 form a group, so averaging a model's
# features over them (test-time views) gives the same answer for any flipped or turned
# copy of a part.

_BANK_ORDER = (0, 2, 1, 3, 4, 6, 5, 7)   # identity, half turn, quarter turns, then mirrored


def orientations(flip: bool, rot90: bool, square: bool = True) -> tuple[int, ...]:
    """Every flip/turn the augmentation may apply, identity first. A half turn is two
    flips, so it belongs to either option; quarter turns need a square input."""
    turns = {0, 1, 2, 3} if rot90 and square else {0, 2} if (rot90 or flip) else {0}
    mirrors = {0, 1} if flip else {0}
    return tuple(k for k in _BANK_ORDER if k % 4 in turns and k // 4 in mirrors)


def test_views(flip: bool, rot90: bool, square: bool = True) -> tuple[int, ...]:
    """The views averaged at prediction: the four quarter turns when turns are allowed,
    else identity, mirrors and half turn when flips are; () when orientation matters."""
    group = orientations(flip, rot90, square)
    if len(group) < 2:
        return ()
    turns = tuple(k for k in group if k < 4)
    return tuple(sorted(turns)) if len(turns) == 4 else tuple(sorted(group))


def orient(image: np.ndarray, k: int) -> np.ndarray:
    """Orientation k of an H x W x C image (see orientations)."""
    return orient_batch(image[None], k)[0]


def orient_batch(x: np.ndarray, k: int) -> np.ndarray:
    """Orientation k of every image of an N x H x W x C batch (x itself for k = 0)."""
    if k == 0:
        return x
    out = np.rot90(x, k % 4, axes=(1, 2))
    return np.ascontiguousarray(out[:, :, ::-1] if k >= 4 else out)


class BatchAugmenter:
    """The Augmenter's transforms on a whole batch where it lies (the GPU), each image with
    its own random draw. The draws are made on the host with numpy (about 0.1 ms for a
    batch) and sent in one non-blocking copy; the pixels then go through a fixed handful
    of tensor operations whatever the batch size: each image's flip, quarter turn and
    affine jitter folded into one sampling grid (one grid_sample, reflected borders),
    contrast and brightness as arithmetic, a 5-tap Gaussian blur per image, and noise.
    Nothing is read back to the host, so the training steps queue up on the GPU. Takes and
    returns float (N, 3, H, W) in 0..255. On the CPU, OpenCV one image at a time is faster
    (Augmenter); this path runs there only when forced (LINESIDE_BATCH_AUGMENT=1, tests)."""

    def __init__(self, cfg: AugmentConfig, square: bool = True, seed: int = 0):
        self.cfg = cfg
        self.square = square
        self.rng = np.random.default_rng(seed)

    def draw(self, n: int, h: int, w: int) -> np.ndarray:
        """(n, 15) float32 per image: the 2 x 3 sampling matrix (output pixel -> input
        pixel, in affine_grid's -1..1 coordinates), contrast, brightness, noise sigma and
        the five blur weights."""
        cfg, rng = self.cfg, self.rng
        q = np.broadcast_to(np.eye(2), (n, 2, 2)).copy()
        if cfg.flip:
            q[:, 0, 0] = np.where(rng.random(n) < 0.5, -1.0, 1.0)
            q[:, 1, 1] = np.where(rng.random(n) < 0.5, -1.0, 1.0)
        if cfg.rot90 and self.square:
            k = rng.integers(0, 4, n)
            c, s = np.array([1, 0, -1, 0])[k], np.array([0, 1, 0, -1])[k]
            q = q @ np.stack([np.stack([c, -s], 1), np.stack([s, c], 1)], 1)
        elif cfg.rot90 and not cfg.flip:     # a half turn (two flips): the turns a non-square image allows
            q = q * np.where(rng.random(n) < 0.5, -1.0, 1.0)[:, None, None]
        m, t = q, np.zeros((n, 2))
        if cfg.affine > 0:
            a, on = cfg.affine, rng.random(n) < 0.7
            angle = np.where(on, rng.uniform(-10, 10, n) * a, 0.0) * (np.pi / 180)
            scale = np.where(on, 1 + rng.uniform(-0.1, 0.1, n) * a, 1.0)
            c, s = np.cos(angle) / scale, np.sin(angle) / scale
            rot = np.stack([np.stack([c, -s * h / w], 1), np.stack([s * w / h, c], 1)], 1)  # in pixels about the centre
            m = q @ rot
            t = (q @ (np.where(on[:, None], rng.uniform(-0.05, 0.05, (n, 2)) * a * 2, 0.0))[:, :, None])[:, :, 0]
        out = np.zeros((n, 15), np.float32)
        out[:, :6] = np.concatenate([m, t[:, :, None]], 2).reshape(n, 6)
        color = (rng.random(n) < 0.8) * cfg.color
        out[:, 6] = 1.0 + rng.uniform(-0.2, 0.2, n) * color
        out[:, 7] = rng.uniform(-20, 20, n) * color
        out[:, 8] = np.where(rng.random(n) < cfg.noise, rng.uniform(2.0, 6.0, n), 0.0)
        sigma = np.where(rng.random(n) < cfg.blur, rng.uniform(0.3, 1.0, n), 1e-3)   # 1e-3: weights 0, 1, 0
        k = np.exp(-np.arange(-2, 3)[None, :] ** 2 / (2 * sigma[:, None] ** 2))
        out[:, 9:14] = k / k.sum(1, keepdims=True)
        out[:, 14] = sigma > 1e-3
        return out

    def __call__(self, x):
        import torch
        import torch.nn.functional as F

        n, _, h, w = x.shape
        draws = self.draw(n, h, w)
        p = torch.from_numpy(draws)
        p = p.pin_memory().to(x.device, non_blocking=True) if x.device.type == "cuda" else p
        cfg = self.cfg
        if cfg.flip or cfg.rot90 or cfg.affine > 0:
            grid = F.affine_grid(p[:, :6].reshape(n, 2, 3), [n, 3, h, w], align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if cfg.color > 0:
            x = (x * p[:, 6, None, None, None] + p[:, 7, None, None, None]).clamp_(0, 255)
        if draws[:, 14].any():
            k = p[:, None, None, None, 9:14]          # rows, then columns: five weighted shifts each
            x = (F.pad(x, (0, 0, 2, 2), mode="reflect").unfold(2, 5, 1) * k).sum(-1)
            x = (F.pad(x, (2, 2, 0, 0), mode="reflect").unfold(3, 5, 1) * k).sum(-1)
        if draws[:, 8].any():
            x = x + torch.randn_like(x) * p[:, 8, None, None, None]
        return x.clamp_(0, 255).round_()
