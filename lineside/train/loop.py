"""The epoch loop every recipe that trains layers shares, and the end-to-end recipes'
images on the device.

`fit_epochs` is a plain function of explicit arguments, as the loop of torchvision's
references/classification/train.py: epochs of `train_one_epoch` under a warm-up and
cosine schedule, validation after each, early stopping on it, and the best epoch's
weights kept. What it trains on comes in as `batches` (a function of the epoch's random
generator) and `forward`, so the fine-tuning of a bank of frozen activations and the
end-to-end recipes run the same loop.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lineside.metrics import balanced_accuracy

from . import distributed
from .data import nchw
from .distributed import Dist
from .infer import fill_up
from .model import Classifier
from .optim import AdamW

log = logging.getLogger(__name__)


def amp_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a GPU that computes in it natively (NVIDIA compute capability 8.0 and
    later: A100, RTX 30 series on; and ROCm), else float16. PyTorch's is_bf16_supported()
    also says yes for older GPUs that only emulate bfloat16 (T4, V100, RTX 20 series),
    where it runs far slower than float16 and cuDNN has no bfloat16 convolutions."""
    if torch.version.hip:
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.get_device_properties(device).major >= 8 else torch.float16


class Amp:
    """Mixed precision as the device allows: bfloat16, or float16 with a gradient scaler
    (amp_dtype), on CUDA; plain float32 on the CPU."""

    def __init__(self, device: torch.device):
        self.device_type = device.type
        self.enabled = device.type == "cuda"
        self.dtype = amp_dtype(device) if self.enabled else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.enabled and self.dtype == torch.float16)

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


def class_weights(counts) -> torch.Tensor:
    """Inverse-frequency class weights (1 for balanced classes)."""
    counts = np.asarray(counts, dtype=np.float64)
    return torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32)


def fit_epochs(model: Classifier, groups: list[dict], *, epochs: int, steps_per_epoch: int, batches, forward,
               validate, stage: str, frozen: int, weight: torch.Tensor | None, label_smoothing: float,
               weight_decay: float, patience: int, seed: int, freeze_bn: bool, device: torch.device, dist: Dist,
               history, progress: bool) -> tuple[int | None, bool]:
    """`epochs` of train_one_epoch on `batches(rng)` through `forward`, with AdamW on the
    parameter `groups` (each with its "lr") under a 5% warm-up then cosine schedule;
    validate() after each epoch (a dict of val_* metrics, or {} without validation
    images), early stopping after `patience` epochs without gain, and the best epoch's
    weights loaded into `model` at the end. Each epoch's row goes to history.add. Ctrl-C
    ends training early but keeps the best model so far. Returns the best epoch (None
    without validation) and whether Ctrl-C ended it."""
    for g in groups:
        g["initial_lr"] = g["lr"]
    opt = optimizer(groups, weight_decay, device)
    total = epochs * steps_per_epoch
    warmup = max(1, int(0.05 * total))

    def lr_scale(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))

    amp = Amp(device)
    rng = np.random.default_rng(seed + 3)
    best_key, best_state, best_epoch, bad_epochs, step, interrupted = None, None, None, 0, 0, False
    bar = tqdm(range(1, epochs + 1), desc=stage, unit="epoch", disable=not progress)
    try:
        for epoch in bar:
            set_train_mode(model, frozen, freeze_bn)
            t0, timing = time.perf_counter(), {}
            loss, step = train_one_epoch(forward, opt, batches(rng), lr_scale, step, amp,
                                         weight=weight, label_smoothing=label_smoothing, timing=timing)
            loss = distributed.mean(loss, dist, device)
            train_s = time.perf_counter() - t0
            model.eval()
            val = validate()
            if val and dist.active:      # every rank follows rank 0's early stopping
                val["val_balanced_accuracy"], val["val_loss"] = distributed.from_main(
                    [val["val_balanced_accuracy"], val["val_loss"]], dist, device)
            history.add(stage=stage, epoch=epoch, train_loss=loss, lr=opt.param_groups[-1]["lr"], **val,
                        seconds=round(time.perf_counter() - t0, 3), train_seconds=round(train_s, 3),
                        first_step_seconds=round(timing.get("first_step_s", float("nan")), 3))
            bar.set_postfix(loss=f"{loss:.3f}",
                            **({"val_bal_acc": f"{val['val_balanced_accuracy']:.3f}"} if val else {}))
            if not val:
                continue
            key = (val["val_balanced_accuracy"], -val["val_loss"])
            if best_key is None or key > best_key:
                best_key, bad_epochs, best_epoch = key, 0, epoch
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad_epochs += 1
                if bad_epochs >= patience:
                    log.info("early stop after epoch %d: no validation gain for %d epochs", epoch, bad_epochs)
                    break
    except KeyboardInterrupt:
        log.warning("interrupted: keeping the best model so far (press Ctrl-C again to abort)")
        interrupted = True
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return best_epoch, interrupted


def optimizer(groups: list[dict], weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW (torch's, without importing torch._dynamo: optim.AdamW); on CUDA its fused form:
    one kernel for every parameter, and with float16's loss scaler (amp_dtype) the check for
    overflowed gradients stays on the GPU (the unfused optimizer makes GradScaler read it
    back every step, a wait for the GPU)."""
    return AdamW(groups, weight_decay=weight_decay, fused=True if device.type == "cuda" else None)


def set_train_mode(model: Classifier, frozen: int, freeze_bn: bool) -> None:
    """Stages [0, frozen) stay frozen and in eval mode; the rest and the head train. With
    `freeze_bn` (pretrained weights, --bn-stats freeze) the trained stages keep their
    BatchNorm statistics (few images estimate them badly); from scratch they must be learned."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for stage in model.stages[frozen:]:
        for p in stage.parameters():
            p.requires_grad_(True)
        stage.train()
        if freeze_bn:
            for m in stage.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
    for p in model.head.parameters():
        p.requires_grad_(True)
    model.dropout.train()


def epoch_indices(y, rng, batch_size: int, balance: str, dist: Dist | None = None, same_size: bool = False):
    """Mini-batch indices for one epoch: a shuffle, or class-balanced draws (`balance`
    "sampler"); with `dist`, this rank's share of them under torchrun (data-parallel
    training); with `same_size`, a short last batch is filled up from the start of the
    epoch's order, so that every step has one shape (on CUDA each new shape costs cuDNN a
    new set of kernels, seconds for a network of depthwise convolutions)."""
    n, bs = len(y), batch_size
    if balance == "sampler":
        counts = np.bincount(y)
        p = 1.0 / counts[y]
        order = rng.choice(n, size=n, replace=True, p=p / p.sum())
    else:
        order = rng.permutation(n)
    if dist is not None:
        order = distributed.shard(order, dist)     # the same order on every rank: each takes its share
        n = len(order)
    for s in range(0, n, bs):
        idx = order[s:s + bs]
        if same_size:
            idx = fill_up(idx, order, bs)
        if len(idx) >= 2 or n == 1:  # a batch of one breaks nothing but wastes a step
            yield idx


def train_one_epoch(forward, optimizer, batches, lr_scale, step: int, amp: Amp, weight=None,
                    label_smoothing: float = 0.0, timing: dict | None = None) -> tuple[float, int]:
    """One pass over `batches` ((inputs, targets) on the model's device): returns the mean
    training loss and the step count after it. The losses are summed on the device and read
    once at the end, so no step waits for the GPU. With `timing`, the first step alone is
    waited for and timed (timing["first_step_s"]): where the kernels are set up."""
    total, n = None, 0
    t0 = time.perf_counter()
    for xb, yb in batches:
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] * lr_scale(step)
        with amp.autocast():
            loss = F.cross_entropy(forward(xb), yb, weight=weight, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        amp.scaler.scale(loss).backward()
        amp.scaler.step(optimizer)
        amp.scaler.update()
        total = loss.detach().float() if total is None else total + loss.detach().float()
        if timing is not None and n == 0:
            if total.is_cuda:
                torch.cuda.synchronize(total.device)
            timing["first_step_s"] = time.perf_counter() - t0
        n += 1
        step += 1
    return (float(total) / n if n else float("nan")), step


# -- the end-to-end recipes' images on the device --------------------------------------

def batch_augment(device: torch.device) -> bool:
    """Augment whole batches on the device (CUDA), or each image with OpenCV (the CPU,
    where that is faster; LINESIDE_BATCH_AUGMENT=1 forces the batched path, for tests)."""
    return device.type == "cuda" or os.environ.get("LINESIDE_BATCH_AUGMENT") == "1"


def resident(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on the device when it takes under half of its free memory, else in pinned host
    memory (each batch gathered by `take` and copied without blocking); on the CPU, t."""
    if device.type != "cuda":
        return t.to(device)
    free, _ = torch.cuda.mem_get_info(device)
    return t.to(device) if t.nbytes < free // 2 else t.pin_memory()


def device_images(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """The uint8 images as one tensor where they are kept for training (resident)."""
    return resident(torch.from_numpy(np.ascontiguousarray(x)), device)


def epoch_steps(steps: list[np.ndarray], *devices) -> list[tuple[torch.Tensor, ...]]:
    """An epoch's step indices (epoch_indices) as tensors on each of `devices`, one tuple
    per step, copied to each device once per epoch: a copy from ordinary host memory in
    every step (PyTorch waits for a blocking copy to finish) would make each step wait for
    the GPU to finish the one before, so the host could not prepare the next batch meanwhile."""
    if not steps:
        return []
    sizes = [len(s) for s in steps]
    flat = torch.from_numpy(np.concatenate(steps))
    on = {}
    for d in map(torch.device, devices):
        if d not in on:
            on[d] = flat.to(d).split(sizes)
    return list(zip(*(on[torch.device(d)] for d in devices)))


def device_batches(data: torch.Tensor, targets: torch.Tensor, steps: list[np.ndarray], device: torch.device):
    """(rows of `data`, their targets) on `device` for each step of an epoch (index arrays
    from epoch_indices): `data` where it is kept (resident), `targets` on the device, the
    epoch's indices copied once (epoch_steps) and each step's rows gathered by take."""
    for at, at_y in epoch_steps(steps, data.device, targets.device):
        yield take(data, at).to(device, non_blocking=True), targets[at_y]


def take(images: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """images[at] (rows `at`, on images' device). From pinned host images (device_images of
    a set too large for the GPU) the rows are gathered into pinned memory too: indexing a
    pinned tensor gives ordinary pageable memory, from which a copy to the GPU waits for
    the host instead of overlapping the steps. PyTorch's pinned-memory cache keeps each
    buffer until its copy has finished."""
    if not images.is_pinned():
        return images[at]
    out = torch.empty((len(at), *images.shape[1:]), dtype=images.dtype, pin_memory=True)
    return torch.index_select(images, 0, at, out=out)


def row_batches(data: torch.Tensor, size: int, device: torch.device):
    """(rows on `device`, how many of them are real) for the rows of `data` in order, in
    batches of exactly `size` rows: the last one filled up with the first rows (fill_up),
    for the caller to drop, so that a whole job has one shape (on CUDA each new shape costs
    cuDNN new kernels). `data` stays where it is kept (the device, or pinned host memory:
    take); the indices are made there, so nothing waits on a copy of them."""
    n = len(data)
    for s in range(0, n, size):
        real = min(size, n - s)
        at = torch.arange(s, s + (size if n >= size else real), device=data.device) % n
        yield take(data, at).to(device, non_blocking=True), real


@torch.inference_mode()
def device_logits(model: Classifier, images: torch.Tensor, batch_size: int, amp: Amp) -> torch.Tensor:
    """Logits (on the CPU) of uint8 NHWC images already on the model's device (or pinned),
    in batches of exactly batch_size (row_batches), under the training's mixed precision:
    read once, at the end."""
    out = []
    for xb, real in row_batches(images, batch_size, next(model.parameters()).device):
        with amp.autocast():
            out.append(model(nchw(xb))[:real].float())
    return torch.cat(out).cpu() if out else torch.zeros(0, model.head.out_features)


def val_metrics(logits: torch.Tensor, y) -> dict:
    """Validation loss, balanced accuracy and accuracy of logits (CPU) for labels y."""
    y_t = torch.from_numpy(np.asarray(y, dtype=np.int64))
    loss = float(F.cross_entropy(logits, y_t))
    pred = logits.argmax(1).numpy()
    return {"val_loss": loss, "val_balanced_accuracy": balanced_accuracy(y, pred),
            "val_accuracy": float(np.mean(pred == y))}
