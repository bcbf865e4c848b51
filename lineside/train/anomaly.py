"""Inspection from good parts alone: an anomaly model on a frozen backbone.

Every image becomes a grid of patch features (middle stages of the ImageNet backbone,
the deeper one upsampled onto the finer grid, mapped onto the good patches' 64 principal
axes, each averaged over its 3x3 neighbourhood). What good patches look like is kept two
ways (SCORERS): a bank of them, thinned by greedy coreset selection to at most
`bank_size` (PatchCore: a patch's anomaly is its distance to the nearest patch of the
bank, wherever in the image it came from), and a Gaussian per grid position (PaDiM: the
Mahalanobis distance to the good patches seen at that place). The default adds the two,
each in units of its own out-of-fold scores; the image's score is the largest value of the
(lightly smoothed) map.

The model answers like a classifier: logits [0, z] with z = (score - threshold) / scale,
so softmax gives [P(good), P(anomalous)] with P(anomalous) > 0.5 exactly when the
score is above the threshold, and training, evaluation, export, the INT8 gate and the
runtime treat it as a two-class model ("good", "anomalous"). The map, divided by the
threshold (1.0 = the threshold), is a second output for heatmaps.

The threshold comes from good images alone: each is scored by a bank built without it
(k folds), a Gumbel (the law of maxima: a score is the largest of its patches') is
fitted to the logarithms of those out-of-fold scores, and the threshold is its
predictive quantile at the false-reject rate asked for (default 1%): the quantile
widened for having estimated mean and spread from only n images; with enough images
(99 or more at 1%) never below the scores' own empirical quantile, which sees a tail
heavier still.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lineside.errors import LinesideError
from lineside.metrics import auroc  # noqa: F401 - where the benchmarks find it
from lineside.spec import InputSpec

from lineside.dataset import ANOMALY_LABELS  # noqa: F401 - ("good", "anomalous")
DEFAULT_TAPS = (3, 5)
DEFAULT_BANK = 2048      # bank alone
BOTH_BANK = 512          # bank beside the Gaussians (default_bank)
DEFAULT_FALSE_REJECT = 0.01
DEFAULT_SHORT_SIDE = 256
FOLDS = 5
MAX_PATCHES = 60_000     # patches the coreset is chosen from (a random sample beyond that)
PROJECTION = 64          # dimensions of the random projection the coreset search runs in
# Principal axes the patch features are mapped onto (272 dimensions for stages 3 and 5 of
# Lite0): the bank of 2048 then takes 0.5 MB instead of 2.2 MB, which the CPU's caches
# hold. Exported to OpenVINO on this 2-core CPU (bottle, 32 good images, 256x256): 232 FPS
# against 164 without it, 0.80x the default classifier's 291 FPS; elpv AUROC with 100
# good cells, 2 draws: 86.7 against 86.8 without it (128 axes: 87.4, but 173 FPS).
DEFAULT_PROJECT = 64
# How a patch is judged: "bank", its distance to the nearest good patch (PatchCore);
# "gaussian", its Mahalanobis distance to the good patches seen at its own place in the
# image (PaDiM: a mean and covariance per grid position); "both", the two distances, each
# in units of a typical good part's (mix_weight), added. Measured in docs/anomaly.md.
SCORERS = ("both", "bank", "gaussian")
DEFAULT_SCORER = "both"
# each position's covariance + SHRINK x its mean variance x identity: 10%, not PaDiM's 1%,
# so that INT8's small errors in the directions good parts hardly vary in stay small
# (bottle, 209 good images: OpenVINO INT8 agreed with FP32 on 100% of the 83 test images,
# against 74.7% with 1%; elpv AUROC of the Gaussian alone the same within 0.1)
SHRINK = 0.1
MIN_SAMPLES_PER_DIM = 3  # the positions pooled into one Gaussian: at least 3 patches per dimension
CHUNK = 8                # images per distance computation (N x patches x bank floats)


class AnomalyModel(nn.Module):
    """(N, 3, H, W) float RGB in 0..255 -> logits (N, 2); score_and_map gives the raw
    score and the threshold-normalised map. `stages`: the backbone's stages up to the
    deepest tap (the rest is never run)."""

    task = "anomaly"
    views = None

    def __init__(self, stages: nn.ModuleList, spec: InputSpec, taps: tuple[int, ...], feature_dim: int,
                 bank_size: int, threshold: float = 1.0, scale: float = 1.0, project: int = 0,
                 scorer: str = "bank", positions: int = 0):
        super().__init__()
        if scorer not in SCORERS or (scorer != "bank" and positions < 1):
            raise ValueError(f"scorer {scorer!r} with {positions} positions")
        self.scorer = scorer
        self.taps = tuple(int(t) for t in taps)
        if not self.taps or sorted(set(self.taps)) != list(self.taps) or self.taps[-1] >= len(stages):
            raise ValueError(f"taps {list(self.taps)} must be increasing stage numbers below {len(stages)}")
        self.stages = nn.ModuleList(stages[:self.taps[-1] + 1])
        self.num_classes = 2
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("channel_scale", torch.ones(feature_dim))
        # an optional linear map of the patch features onto their `project` principal axes
        # (fitted on the good patches): distances in fewer dimensions, a faster scorer
        self.project = int(project)
        dim = self.project or feature_dim
        if self.project:
            self.register_buffer("projection", torch.zeros(feature_dim, self.project))
        if scorer != "gaussian":
            self.register_buffer("bank", torch.zeros(bank_size, dim))
            self.register_buffer("bank_sq", torch.zeros(bank_size))
        if scorer != "bank":   # per grid position: the good patches' mean, and W with W W^T = covariance^-1
            self.register_buffer("patch_mean", torch.zeros(positions, dim))
            self.register_buffer("whiten", torch.zeros(positions, dim, dim))
        if scorer == "both":   # each distance's weight (mix_weight)
            self.register_buffer("mix", torch.ones(2))
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.register_buffer("scale", torch.tensor(float(scale)))

    def patch_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) 0..255 -> (N, C, h, w) patch features on the grid of the first tap."""
        h = (x - self.mean) / self.std
        maps = []
        for i, stage in enumerate(self.stages):
            h = stage(h)
            if i in self.taps:
                maps.append(h)
        size = maps[0].shape[-2:]
        maps = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                for m in maps]
        f = torch.cat(maps, 1) * self.channel_scale.view(1, -1, 1, 1)
        if self.project:   # before the pooling, which commutes with it: fewer channels to pool
            f = torch.einsum("nchw,ck->nkhw", f, self.projection)
        return F.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=False)

    def distances(self, f: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, h, w): each patch's distance to its nearest bank patch."""
        n, c, hh, ww = f.shape
        flat = f.permute(0, 2, 3, 1).reshape(n, hh * ww, c)
        if self.scorer == "bank":
            d = nearest_distance(flat, self.bank, self.bank_sq)
        elif self.scorer == "gaussian":
            d = mahalanobis(flat, self.patch_mean, self.whiten)
        else:
            d = (nearest_distance(flat, self.bank, self.bank_sq) * self.mix[0]
                 + mahalanobis(flat, self.patch_mean, self.whiten) * self.mix[1])
        return d.reshape(n, hh, ww)

    def shape(self) -> dict:
        """What rebuilds an empty model of this shape (checkpoint entries; see empty_model)."""
        out = {"taps": list(self.taps), "feature_dim": int(self.channel_scale.shape[0]),
               "bank_size": int(self.bank.shape[0]) if hasattr(self, "bank") else 1, "projection": int(self.project)}
        if self.scorer != "bank":
            out.update(scorer=self.scorer, positions=int(self.patch_mean.shape[0]))
        return out

    def raw_map(self, x: torch.Tensor) -> torch.Tensor:
        return smooth(self.distances(self.patch_features(x)))

    def score_and_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.raw_map(x)
        return torch.amax(m, dim=(1, 2)), m / self.threshold

    def logits_from_score(self, score: torch.Tensor) -> torch.Tensor:
        z = (score - self.threshold) / self.scale
        return torch.stack([torch.zeros_like(z), z], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from_score(self.score_and_map(x)[0])


def spec_for(images_hw: list[tuple[int, int]], base: InputSpec, short_side: int) -> InputSpec:
    """The input size for an anomaly model: the short side `short_side`, the long side
    scaled by the images' median aspect ratio (so a 500x1250 part is not squeezed into a
    square), both multiples of 32, the long side at most 4x the short."""
    ratios = [w / h for h, w in images_hw] or [1.0]
    r = float(np.median(ratios))
    r = min(max(r, 0.25), 4.0)
    unit = 32
    s = max(unit, int(round(short_side / unit)) * unit)
    if r >= 1:
        h, w = s, max(unit, int(round(s * r / unit)) * unit)
    else:
        h, w = max(unit, int(round(s / r / unit)) * unit), s
    from dataclasses import replace

    return replace(base, height=h, width=w)


def to_input(x: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(device).permute(0, 3, 1, 2).float()


@torch.no_grad()
def extract(model: AnomalyModel, x: np.ndarray, device, progress=None) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> patch features (N, h*w, C) on the CPU."""
    out = []
    for s in range(0, len(x), CHUNK):
        f = model.patch_features(to_input(x[s:s + CHUNK], device))
        out.append(f.permute(0, 2, 3, 1).reshape(f.shape[0], -1, f.shape[1]).float().cpu())
        if progress is not None:
            progress(len(f))
    return torch.cat(out)


def greedy_coreset(patches: torch.Tensor, size: int, seed: int, device) -> torch.Tensor:
    """Indices of `size` patches chosen greedily, each the farthest from those already
    chosen (k-center), in a random projection (PatchCore's coreset)."""
    n = len(patches)
    if n <= size:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(patches.shape[1], PROJECTION, generator=g) / math.sqrt(PROJECTION)
    z = (patches @ proj).to(device)
    sq = (z * z).sum(1)
    chosen = torch.empty(size, dtype=torch.long)
    j = int(torch.randint(n, (1,), generator=g))
    nearest = torch.full((n,), float("inf"), device=z.device)
    for i in range(size):
        chosen[i] = j
        # |z - z_j|^2 as |z|^2 - 2 z.z_j + |z_j|^2: one matrix-vector product, no n x d temporary
        torch.minimum(nearest, sq - 2.0 * (z @ z[j]) + sq[j], out=nearest)
        j = int(torch.argmax(nearest))
    return chosen


def build_bank(feats: torch.Tensor, size: int, seed: int, device) -> torch.Tensor:
    """(N, P, C) patch features of good images -> (<= size, C) bank."""
    flat = feats.reshape(-1, feats.shape[-1])
    if len(flat) > MAX_PATCHES:
        g = torch.Generator().manual_seed(seed + 1)
        flat = flat[torch.randperm(len(flat), generator=g)[:MAX_PATCHES]]
    return flat[greedy_coreset(flat, size, seed, device)].clone()


def nearest_distance(flat: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor) -> torch.Tensor:
    """(N, P, C) patches -> (N, P): the distance of each to its nearest bank patch.
    |f - b|^2 = |f|^2 + (|b|^2 - 2 f.b): the bracket as one product with the bank extended by
    a row (a constant in an exported graph), so that the patches x bank matrix is touched
    once more only, by the minimum."""
    ones = torch.ones_like(flat[..., :1])
    extended = torch.cat([-2.0 * bank.t(), bank_sq.unsqueeze(0)], 0)
    d2 = (flat * flat).sum(-1) + (torch.cat([flat, ones], -1) @ extended).amin(-1)
    return torch.sqrt(torch.clamp(d2, min=0.0))


def mahalanobis(flat: torch.Tensor, mean: torch.Tensor, whiten: torch.Tensor) -> torch.Tensor:
    """(N, P, C) patches -> (N, P): each patch's Mahalanobis distance to the Gaussian of its
    own grid position: |(f_p - mean_p) W_p|, a batched product over the positions."""
    z = (flat - mean).transpose(0, 1)                       # (P, N, C)
    return torch.matmul(z, whiten).pow(2).sum(-1).sqrt().transpose(0, 1)


def neighbourhood(n: int, dim: int) -> int:
    """The radius of the square of grid positions whose patches one position's Gaussian is
    estimated from: the smallest that gives MIN_SAMPLES_PER_DIM patches per dimension (200
    good images: each position alone; 32: 3x3; 8: 5x5), at most 7x7."""
    return next((r for r in range(3) if n * (2 * r + 1) ** 2 >= MIN_SAMPLES_PER_DIM * dim), 3)


def gaussian_radius(n: int, dim: int, hw: tuple[int, int]) -> int:
    """The neighbourhood of a model of n good images: that of its out-of-fold fits (on n
    less one fold), so that the threshold set on their scores fits the model's own (with 8
    bottles, a 5x5 model under a threshold from 7x7 folds flagged 7.7% of the unseen good
    bottles for 1% promised); never wider than a sixteenth of the grid's short side (at
    least 1), or a position's Gaussian would describe much of the part rather than its place."""
    return min(neighbourhood(fold_size(n), dim), max_radius(hw))


def fold_size(n: int) -> int:
    """Good images an out-of-fold fit of n is trained on (the fewest)."""
    return n - math.ceil(n / min(FOLDS, n))


def max_radius(hw: tuple[int, int]) -> int:
    return max(1, min(hw) // 16)


def gaussians_fit(n: int, dim: int, hw: tuple[int, int]) -> bool:
    """Whether n good images are enough for a Gaussian per position: MIN_SAMPLES_PER_DIM
    patches per dimension within the widest neighbourhood, in every out-of-fold fit (10
    images at 256x256). With 8 bottles the Gaussians beside the bank flagged 4.2% of the
    unseen good bottles for 1% promised (the model's own scale, estimated from so few,
    moves every score alike), and the bank alone 1.5%."""
    return fold_size(n) * (2 * max_radius(hw) + 1) ** 2 >= MIN_SAMPLES_PER_DIM * dim


@torch.no_grad()
def fit_gaussians(feats: torch.Tensor, hw: tuple[int, int], device,
                  radius: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, P, C) patch features of good images -> per grid position the mean (P, C) and W
    (P, C, C) with W W^T the inverse of the covariance, estimated from the patches of the
    positions within `radius` of it (neighbourhood() by default), shrunk towards SHRINK x
    its mean variance."""
    n, p, c = feats.shape
    r = neighbourhood(n, c) if radius is None else radius
    s1 = torch.zeros(p, c, dtype=torch.float64, device=device)
    s2 = torch.zeros(p, c, c, dtype=torch.float64, device=device)
    for s in range(0, n, CHUNK * 4):
        f = feats[s:s + CHUNK * 4].to(device, torch.float64)
        s1 += f.sum(0)
        s2 += torch.einsum("npc,npd->pcd", f, f)

    def pooled(x):   # (P, K) sums -> their mean over each position's neighbourhood, per image
        grid = x.t().reshape(1, -1, *hw)
        out = F.avg_pool2d(grid, 2 * r + 1, stride=1, padding=r, count_include_pad=False) if r else grid
        return out.reshape(x.shape[1], p).t() / n

    mean = pooled(s1)
    cov = pooled(s2.reshape(p, c * c)).reshape(p, c, c) - mean[:, :, None] * mean[:, None, :]
    ridge = SHRINK * cov.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)
    cov = cov + ridge[:, None, None] * torch.eye(c, dtype=cov.dtype, device=device)
    whiten = torch.linalg.cholesky(torch.linalg.inv(cov))
    return mean.float(), whiten.float()


def smooth(d: torch.Tensor) -> torch.Tensor:
    """(N, h, w) patch distances averaged over each 3x3 neighbourhood: the anomaly map."""
    return F.avg_pool2d(d.unsqueeze(1), 3, stride=1, padding=1, count_include_pad=False)[:, 0]


def default_bank(scorer: str) -> int:
    """The bank's size when --bank is not given: smaller beside the Gaussians, where 512
    patches do as well as 2048 (AUROC, 3 draws: elpv with 200 good cells 93.2 and 93.3,
    with 32 90.6 both; MVTec bottle with 8 good images 99.4 both) and the exported model
    runs at 0.91x the classifier's frames per second instead of 0.68x."""
    return BOTH_BANK if scorer == "both" else DEFAULT_BANK


def fit_memory(feats: torch.Tensor, hw: tuple[int, int], scorer: str, bank_size: int, seed: int,
               device, radius: int | None = None) -> dict:
    """The buffers `scorer` judges patches by, fitted on good patch features (N, P, C)."""
    out = {}
    if scorer != "gaussian":
        out["bank"] = build_bank(feats, bank_size, seed, device).to(device)
        out["bank_sq"] = (out["bank"] * out["bank"]).sum(1)
    if scorer != "bank":
        out["patch_mean"], out["whiten"] = fit_gaussians(feats, hw, device, radius)
    return out


@torch.no_grad()
def distance_parts(feats: torch.Tensor, memory: dict, device) -> list[torch.Tensor]:
    """Patch features (N, P, C) -> each of the memory's distances (N, P), on the CPU."""
    parts = []
    if "bank" in memory:
        parts.append(lambda f: nearest_distance(f, memory["bank"], memory["bank_sq"]))
    if "whiten" in memory:
        parts.append(lambda f: mahalanobis(f, memory["patch_mean"], memory["whiten"]))
    return [torch.cat([part(feats[s:s + CHUNK].to(device)).cpu() for s in range(0, len(feats), CHUNK)])
            for part in parts]


def image_scores(parts: list[torch.Tensor], mix, hw: tuple[int, int]) -> np.ndarray:
    """Image scores as the model gives them: the distances mixed, smoothed, their maximum."""
    d = sum(float(m) * part for m, part in zip(mix, parts))
    return torch.amax(smooth(d.reshape(len(d), *hw)), dim=(1, 2)).numpy().astype(np.float64)


def folds_of(n: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    fold = np.empty(n, int)
    fold[rng.permutation(n)] = np.arange(n) % k
    return fold


EULER_GAMMA = 0.5772156649015329
STANDARD_GUMBEL_SD = math.pi / math.sqrt(6.0)    # location 0, scale 1: mean Euler's gamma, this sd


def gumbel_survival(x, mean=EULER_GAMMA, sd=STANDARD_GUMBEL_SD):
    """P(X > x) for a Gumbel (maximum) distribution of the given mean and sd (the
    standard one, location 0 and scale 1, by default)."""
    beta = np.maximum(sd, 1e-12) * math.sqrt(6.0) / math.pi
    mu = mean - EULER_GAMMA * beta
    return -np.expm1(-np.exp(-(x - mu) / beta))


@functools.lru_cache(maxsize=8)
def standard_gumbel_samples(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The means and sds of simulated samples of n standard Gumbel draws (a fixed seed:
    the same n gives the same figures), simulated once per n for gumbel_k and
    expected_false_reject. A location-scale family makes the exceedance of mean + k * sd
    independent of the true location and scale, so these are all either needs."""
    n = max(int(n), 2)
    sims = int(min(20000, max(2000, 4_000_000 // n)))
    x = np.random.default_rng(0).gumbel(0.0, 1.0, (sims, n))
    return x.mean(1), x.std(1, ddof=1)


def gumbel_k(false_reject: float, n: int) -> float:
    """k such that a new good image's log-score exceeds mean + k * sd of n out-of-fold
    log-scores with probability `false_reject` when the log-scores follow a Gumbel
    distribution, the mean and sd being estimated from those n: the predictive quantile,
    found by bisection on the simulated samples (standard_gumbel_samples). Large n tends
    to the plain quantile, 3.14 at 1%; 8 images need 4.67."""
    mean, sd = standard_gumbel_samples(n)
    lo, hi = 0.0, 100.0
    for _ in range(50):
        k = 0.5 * (lo + hi)
        rate = float(np.mean(gumbel_survival(mean + k * sd)))
        lo, hi = (k, hi) if rate > false_reject else (lo, k)
    return 0.5 * (lo + hi)


def log_moments(scores: np.ndarray) -> tuple[float, float, int]:
    """(mean, sd, n) of the scores' logarithms, the sd at least 1e-3."""
    logs = np.log(np.maximum(np.asarray(scores, np.float64), 1e-12))
    n = len(logs)
    return float(logs.mean()), max(float(logs.std(ddof=1)) if n > 1 else 0.0, 1e-3), n


def gumbel_threshold(scores: np.ndarray, false_reject: float) -> tuple[float, float, float]:
    """(threshold, sd of log-scores, k): exp(mean + k * sd) of the out-of-fold log-scores,
    k from gumbel_k: the predictive (1 - false_reject) quantile of a new good image's
    log-score under a Gumbel fitted by its moments. An image's score is the largest of
    its patches' distances, and maxima tend to a Gumbel, whose upper tail is heavier
    than a normal's (the quantile at 1% lies 3.14 sd above the mean, not 2.33). A normal
    fitted to the log-scores (the rule before) flagged 3.3, 3.0, 1.7 and 3.6% of the
    unseen good bottles for 1% promised with 8, 16, 32 and 64 of them, and 5.7% of
    NEU's unseen rolled-in scale with 64; this rule 1.5, 0.8, 0.3, 1.8 and 1.5%
    (benchmarks/anomaly_threshold.py)."""
    mean, sd, n = log_moments(scores)
    k = gumbel_k(false_reject, n)
    return math.exp(mean + k * sd), sd, k


def empirical_threshold(scores: np.ndarray, false_reject: float) -> float | None:
    """The (1 - false_reject) quantile of the out-of-fold scores at the Weibull plotting
    position (the order statistic that a new image exceeds with probability false_reject,
    whatever the distribution); None with too few images to have one ((n + 1)(1 - rate) > n:
    fewer than 99 at 1%). A log-normal fitted to the whole sample misses a heavy upper
    tail: elpv, 200 good cells, 1% promised, 2 draws: 4.1% and 2.9% of the ~1300 unseen good
    cells flagged at a log-normal's threshold, 0.9% and 2.1% at this one."""
    n = len(scores)
    if (n + 1) * (1.0 - false_reject) > n:
        return None
    return float(np.quantile(np.asarray(scores, np.float64), 1.0 - false_reject, method="weibull"))


def expected_false_reject(scores: np.ndarray, threshold: float) -> dict:
    """The false-reject rate the threshold promises, with a 90% interval: the spread of
    the rates that a threshold set this way (as many standard deviations above the mean
    of as many out-of-fold log-scores) gives when the good parts' log-scores follow the
    Gumbel, over draws of that many good images (standard_gumbel_samples); with few
    images it is wide, and says so. (A bootstrap of the scores, refitting the
    distribution to each resample, gave intervals that did not hold the promised rate
    with 8 images: a resample's spread is smaller.) Also the share of the out-of-fold
    scores themselves above the threshold."""
    mean, sd, n = log_moments(scores)
    k = (math.log(threshold) - mean) / sd      # the threshold, in sds above the mean
    sim_mean, sim_sd = standard_gumbel_samples(n)
    rates = gumbel_survival(sim_mean + k * sim_sd)
    lo, hi = np.percentile(rates, [5, 95])
    return {"interval_90": [float(lo), float(hi)], "mean": float(rates.mean()),
            "out_of_fold_above": int((np.asarray(scores) > threshold).sum()), "out_of_fold_images": int(n)}


@dataclass
class AnomalyFit:
    model: AnomalyModel
    info: dict


def fit_anomaly(x_good: np.ndarray, spec: InputSpec, backbone: str = "efficientnet_lite0", weights: str = "imagenet",
                taps=DEFAULT_TAPS, bank_size: int | None = None, false_reject: float = DEFAULT_FALSE_REJECT,
                seed: int = 0, device: str | torch.device = "cpu", progress=None,
                project: int = DEFAULT_PROJECT, scorer: str = DEFAULT_SCORER) -> AnomalyFit:
    """Fit on good images only: uint8 (N, H, W, 3) at `spec`'s size: their patch features
    (good_features), the threshold from out-of-fold scores, the bank of all of them."""
    if len(x_good) < 4:
        raise LinesideError(f"anomaly training needs at least 4 good images (found {len(x_good)})")
    if scorer not in SCORERS:
        raise LinesideError(f"--scorer: {scorer!r} is not one of {', '.join(SCORERS)}")
    requested = scorer
    if not 0.0001 <= false_reject <= 0.2:
        raise LinesideError(f"--false-reject: {false_reject:g} is outside 0.0001..0.2 (a share: 0.01 is 1%)")
    device = torch.device(device)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    entry, model, feats = good_features(x_good, spec, backbone, weights, taps, bank_size or DEFAULT_BANK, seed,
                                        device, progress, project)
    grid = _grid(model, spec, device)
    t_feat = time.perf_counter() - t0
    if scorer == "both" and not gaussians_fit(len(feats), feats.shape[-1], grid):
        scorer = "bank"
    bank_size = bank_size or default_bank(scorer)
    radius = gaussian_radius(len(feats), feats.shape[-1], grid)   # the folds' and the model's alike
    oof, k, mix = out_of_fold_scores(feats, grid, bank_size, seed, device, scorer, radius)
    threshold, sigma, z = gumbel_threshold(oof, false_reject)
    fitted, empirical = threshold, empirical_threshold(oof, false_reject)
    if empirical is not None:
        threshold = max(threshold, empirical)
    memory = fit_memory(feats, grid, scorer, bank_size, seed, device, radius)
    model = with_scorer(model, spec, scorer, grid, len(memory.get("bank", [0])))
    for name, value in memory.items():
        setattr(model, name, value)
    if scorer == "both":
        model.mix.copy_(torch.tensor(mix))
    model.threshold.fill_(threshold)
    model.scale.fill_(max(threshold * sigma, 1e-6))
    info = {
        "task": "anomaly", "backbone": entry.name, "taps": list(model.taps), "scorer": scorer,
        "scorer_note": None if scorer == requested else (
            f"the bank alone: {len(feats)} good images are too few for a Gaussian per position "
            f"(at least {MIN_SAMPLES_PER_DIM} patches per dimension within {2 * max_radius(grid) + 1}x"
            f"{2 * max_radius(grid) + 1} positions, in each out-of-fold fit)"),
        "bank": int(len(memory["bank"])) if "bank" in memory else None,
        "gaussian_neighbourhood": 2 * radius + 1 if "whiten" in memory else None,
        "projection": model.project or None, "patches_per_image": int(grid[0] * grid[1]), "grid": list(grid),
        "threshold": threshold, "scale": float(model.scale), "false_reject_target": false_reject,
        "threshold_fit": {"method": "the larger of the predictive quantile of a Gumbel fitted to the "
                                    "out-of-fold log-scores of the good images and, with enough images, their "
                                    "empirical quantile", "folds": k, "sigma_log": sigma, "k": z,
                          "gumbel": fitted, "empirical": empirical,
                          "chosen": "empirical" if empirical is not None and empirical > fitted else "gumbel"},
        "false_reject_expected": expected_false_reject(oof, threshold),
        "out_of_fold_scores": [float(v) for v in oof],
        "seconds": {"features": round(t_feat, 2), "total": round(time.perf_counter() - t0, 2)},
    }
    return AnomalyFit(model, info)


def out_of_fold_scores(feats: torch.Tensor, grid, bank_size: int, seed: int, device, scorer: str = "bank",
                       radius: int | None = None) -> tuple[np.ndarray, int, list[float]]:
    """Each good image's score by a memory fitted without it (FOLDS folds), the folds, and
    the mix: for "both", each distance's weight (mix_weight: neither decides alone by its
    units), else [1]. `radius`: the Gaussians' neighbourhood (the model's own)."""
    n = len(feats)
    k = min(FOLDS, n)
    fold = torch.from_numpy(folds_of(n, k, seed))
    parts = None
    for f in range(k):
        held = fold == f
        memory = fit_memory(feats[~held], grid, scorer, bank_size, seed + f, device, radius)
        got = distance_parts(feats[held], memory, device)
        if parts is None:
            parts = [torch.empty(n, p.shape[1]) for p in got]
        for whole, part in zip(parts, got):
            whole[held] = part
    mix = [1.0] * len(parts)
    if len(parts) > 1:
        mix = [mix_weight(image_scores([part], [1.0], grid)) for part in parts]
    return image_scores(parts, mix, grid), k, mix


def mix_weight(scores: np.ndarray) -> float:
    """One distance's weight in the mix: 1 / the median of its out-of-fold image scores, so
    that each counts in units of a typical good part (with 512 patches in the bank, AUROC
    on elpv with 200 good cells 93.2 against 91.0 when also divided by the spread of the
    log-scores; MVTec bottle with 8 good images 99.4 against 99.6; docs/anomaly.md)."""
    return 1.0 / max(float(np.median(np.asarray(scores, np.float64))), 1e-12)


def good_features(x_good, spec: InputSpec, backbone: str, weights: str, taps, bank_size: int, seed: int, device,
                  progress, project: int):
    """(backbone entry, the model without its bank, the good images' patch features):
    each tap's channels weighed alike and, with `project`, mapped onto the patches'
    principal axes."""
    from .backbones import build_backbone
    from .model import stage_widths

    entry, net = build_backbone(backbone, weights)
    widths = stage_widths(net)
    taps = tuple(sorted(set(int(t) for t in taps)))
    if taps[-1] >= len(widths):
        raise LinesideError(f"--taps: stages of {backbone} are 0..{len(widths) - 1}")
    dim = sum(widths[t] for t in taps)
    project = int(project) if project and project < dim else 0
    model = AnomalyModel(net.stages, spec, taps, dim, bank_size).to(device).eval()
    feats = extract(model, x_good, device, progress)
    # each tap's channels weighed so that the taps count alike in a distance (else the
    # stage with the larger activations decides alone)
    offsets = np.cumsum([0] + [widths[t] for t in taps])
    weight = torch.ones(dim)
    for a, b in zip(offsets[:-1], offsets[1:]):
        rms = float(feats[..., a:b].pow(2).sum(-1).mean().sqrt())
        weight[a:b] = 1.0 / max(rms, 1e-6)
    feats *= weight
    model.channel_scale.copy_(weight.to(device))
    if project:
        axes = principal_axes(feats.reshape(-1, dim), project, seed)
        feats = feats @ axes
        stages_scale = model.channel_scale.clone()
        model = AnomalyModel(model.stages, spec, taps, dim, bank_size, project=project).to(device).eval()
        model.channel_scale.copy_(stages_scale)
        model.projection.copy_(axes.to(device))
    return entry, model, feats


def empty_model(stages: nn.ModuleList, spec: InputSpec, shape: dict) -> AnomalyModel:
    """The model a checkpoint entry (AnomalyModel.shape's fields) describes, with empty
    buffers; ValueError when the entry is malformed."""
    ints = ("feature_dim", "bank_size")
    valid = (isinstance(shape, dict) and isinstance(shape.get("taps"), list) and shape["taps"]
             and all(isinstance(t, int) for t in shape["taps"])
             and all(isinstance(shape.get(k), int) and shape[k] >= 1 for k in ints)
             and isinstance(shape.get("projection", 0), int) and 0 <= shape.get("projection", 0) < shape["feature_dim"]
             and shape.get("scorer", "bank") in SCORERS and isinstance(shape.get("positions", 0), int))
    if not valid:
        raise ValueError("invalid anomaly model entry")
    return AnomalyModel(stages, spec, tuple(shape["taps"]), shape["feature_dim"], shape["bank_size"],
                        project=shape.get("projection", 0), scorer=shape.get("scorer", "bank"),
                        positions=shape.get("positions", 0))


def with_scorer(model: AnomalyModel, spec: InputSpec, scorer: str, grid, bank_size: int) -> AnomalyModel:
    """The same model (its stages, channel weights and projection) with empty buffers for
    `scorer` on a grid of `grid` positions (a "bank" model as it is: its bank is replaced)."""
    if scorer == model.scorer:
        return model
    dim = model.channel_scale.shape[0]
    new = AnomalyModel(model.stages, spec, model.taps, dim, bank_size, project=model.project, scorer=scorer,
                       positions=grid[0] * grid[1]).to(model.channel_scale.device).eval()
    new.channel_scale.copy_(model.channel_scale)
    if model.project:
        new.projection.copy_(model.projection)
    return new


def principal_axes(patches: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """(C, k): the k principal axes of (a sample of up to MAX_PATCHES) patch features."""
    if len(patches) > MAX_PATCHES:
        g = torch.Generator().manual_seed(seed + 2)
        patches = patches[torch.randperm(len(patches), generator=g)[:MAX_PATCHES]]
    x = patches.double() - patches.double().mean(0)
    _, vectors = torch.linalg.eigh(x.t() @ x)
    return vectors[:, -k:].flip(1).float().contiguous()


def _grid(model: AnomalyModel, spec: InputSpec, device) -> tuple[int, int]:
    with torch.no_grad():
        f = model.patch_features(torch.zeros(1, 3, spec.height, spec.width, device=device))
    return int(f.shape[2]), int(f.shape[3])


@torch.no_grad()
def anomaly_scores(model: AnomalyModel, x: np.ndarray, device=None, maps: bool = False):
    """Raw scores (N,) and, with maps, the threshold-normalised maps (N, h, w)."""
    device = device or next(model.parameters()).device
    model.eval()
    scores, out = [], []
    for s in range(0, len(x), CHUNK):
        sc, m = model.score_and_map(to_input(x[s:s + CHUNK], device))
        scores.append(sc.cpu().numpy())
        if maps:
            out.append(m.cpu().numpy())
    scores = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    return (scores, np.concatenate(out)) if maps else scores


@torch.no_grad()
def anomaly_logits(model: AnomalyModel, x: np.ndarray, device=None, progress=None) -> np.ndarray:
    """Logits (N, 2) of uint8 images, CHUNK at a time; progress(k) after every k images."""
    device = device or next(model.parameters()).device
    model.eval()
    out = []
    for s in range(0, len(x), CHUNK):
        out.append(model(to_input(x[s:s + CHUNK], device)).float().cpu().numpy())
        if progress is not None:
            progress(len(out[-1]))
    return np.concatenate(out) if out else np.zeros((0, 2), np.float32)
