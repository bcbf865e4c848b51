"""auto's choice of head, with enough images to fine-tune: a linear head on the middle
stages, on the last stage, or fine-tuning, by cross-validation on the training images
and the time fine-tuning would take on this machine (--time-budget)."""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .data import to_tensor
from .heads import cross_validated_probe, pooled_stage_features
from .infer import exact_fp32
from .loop import Amp
from .model import TAPS_POOL, Classifier, resolve_taps, stage_widths

AUTO_TAPS_MARGIN = 0.02  # auto picks middle-stage taps when they beat the last stage by 2 points in CV
AUTO_CV_REPEATS = 3  # auto's cross-validation: mean over this many splits into folds


def choose_head(model: Classifier, x_train: np.ndarray, y_train: np.ndarray, device: torch.device, seed: int,
                time_budget: float, estimate: Callable[[], tuple[float, int]] | None, strategy: str,
                reason: str) -> tuple[str, str, dict, tuple[int, ...] | None]:
    """Compare a linear head on the middle stages with one on the last stage by
    cross-validation on the training images (one plain pass through the frozen network,
    then a few logistic regressions: seconds). Middle stages describe textures
    (scratches, pits, scale) better than the last, ImageNet-object stage; when they win
    clearly, a linear head on them is the recipe. Otherwise the fine-tuning recipe
    (`strategy`, `reason`) stands, unless its estimated time (`estimate()`: seconds and
    calibration trainings; None: no limit applies) is over `time_budget`: then the linear
    head that scored better. Returns the strategy, its reason, the cross-validated scores,
    and the middle stages when the head is to read them (else None)."""
    n = len(model.stages)
    mid = resolve_taps("mid", n)
    feats = pooled_stage_features(model, x_train, device, pool=TAPS_POOL)
    last_width = stage_widths(model.backbone)[n - 1]   # the last stage as fine-tuning reads it: averaged
    last_acc = cross_validated_probe(feats[n - 1][:, :last_width], y_train, seed, repeats=AUTO_CV_REPEATS)
    mid_acc = cross_validated_probe(np.concatenate([feats[t] for t in mid], 1), y_train, seed,
                                    repeats=AUTO_CV_REPEATS)
    cv = {"last_stage": round(last_acc, 4), "middle_stages": round(mid_acc, 4)}
    mid_head = f"a linear head on the average and the maximum of stages {mid[0]}-{mid[-1]}"
    if mid_acc >= last_acc + AUTO_TAPS_MARGIN:
        return "linear", (f"auto: middle-stage features separate the training images better than the last "
                          f"stage in cross-validation ({mid_acc:.1%} vs {last_acc:.1%}): {mid_head}"), cv, mid
    scores = f"cross-validated linear heads: last stage {last_acc:.1%}, middle stages {mid_acc:.1%}"
    if estimate is None:
        return strategy, reason + f" ({scores})", cv, None
    seconds, folds = estimate()
    cv["finetune_estimate_s"] = round(seconds, 1)
    cost = f"{seconds:.0f} s on this machine" + (f" with its {folds} calibration trainings" if folds else "")
    if seconds <= time_budget:
        return strategy, reason + f" ({scores}; estimated {cost}, within --time-budget {time_budget:.0f} s)", cv, None
    over = f"auto: fine-tuning would take about {cost}, over --time-budget {time_budget:.0f} s ({scores})"
    if last_acc > mid_acc:   # the better of the two cross-validated heads, the model as it is
        return "linear", f"{over}: a linear head on the last stage instead", cv, None
    return "linear", f"{over}: {mid_head} instead", cv, mid


def estimate_finetune_s(model: Classifier, x_train: np.ndarray, y_train: np.ndarray, frozen: int, views: int,
                        epochs: int, batch_size: int, device: torch.device) -> float:
    """Seconds one training of the fine-tuning recipe would take on this machine: its bank
    (views x images through the stages before `frozen`), the head's fit and its epochs of
    steps through the trained stages, from one batch timed through each (the fastest of
    three passes, after one that warms the kernels)."""
    n = len(y_train)
    rows = views * n
    batch = min(batch_size, rows)
    x = to_tensor(x_train[np.arange(batch) % n], device)
    target = torch.from_numpy(np.asarray(y_train)[np.arange(batch) % n]).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    amp = Amp(device)      # the steps in the training's precision (bfloat16 on CUDA)
    model.eval()
    trunk_s, step_s = [], []
    for _ in range(4):
        with torch.no_grad(), exact_fp32():     # as the bank is computed
            t0 = time.perf_counter()
            h = model.trunk(x, frozen)
            sync()
            trunk_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with amp.autocast():
            loss = F.cross_entropy(model.head(model.features(h, frozen)), target)
        loss.backward()
        sync()
        step_s.append(time.perf_counter() - t0)
    for p in model.parameters():
        p.grad = None
    trunk_s, step_s = min(trunk_s[1:]), min(step_s[1:])
    steps = math.ceil(rows / batch)
    return steps * trunk_s + steps * step_s * (epochs + 0.5)   # bank, head (a forward pass), epochs
