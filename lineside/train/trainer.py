"""Training: the practitioner's transfer-learning recipes, fast on a CPU.

linear    frozen backbone as feature extractor + new linear head.
finetune  head on the frozen backbone first, then the deepest stages and the head
          together with a learning rate ten times smaller.
full      every layer trained from the start (new head at lr, backbone at lr/10).
scratch   `full` from random weights, for comparison.

Where the shallow stages stay frozen (linear, finetune) their activations are
computed once per image for a fixed number of views (the "bank": first the
flips and quarter turns the augmentation allows, exactly, then random augmented
copies) and reused every epoch: the costly high-resolution layers run once, and only the
deep, low-resolution stages are trained. That is what makes few-shot
fine-tuning take a minute or two on a two-core CPU.

Training is a plan of plain steps: `start` (the run and its untrained model), `train`
(the recipe, top to bottom), `calibrate_temperature`; each step takes what it needs and
returns what it made. The epoch loop the recipes share is loop.py, the linear heads' fit
heads.py, and auto's choice between heads auto.py. `Trainer` wraps the steps for the
studies and tests.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from lineside.errors import LinesideError

from .augment import Augmenter, BatchAugmenter, orient_batch, orientations, test_views
from .auto import choose_head, estimate_finetune_s
from .backbones import build_backbone
from .config import TrainConfig
from . import distributed
from .data import in_layout, place, to_tensor
from .device import pick_device
from .distributed import Dist
from .heads import INFER_BATCH, fit_linear_head
from .infer import FrozenForward, backend_for, embed_tensors, exact_fp32, frozen_forward
from .loop import (Amp, batch_augment, class_weights, device_batches, device_images, device_logits, epoch_indices,
                   fit_epochs, resident, row_batches, val_metrics)
from .model import TAPS_POOL, Classifier, resolve_taps

log = logging.getLogger(__name__)

# auto: below this many images in the smallest class a fine-tuned network cannot be
# validated or trusted more than its frozen features; see README "Choosing a recipe".
AUTO_LINEAR_BELOW = 3
VIEWS_BUDGET = 1200  # augmented views cached per training run (before the 16-per-image cap)
BANK_CHUNK = 256  # images augmented and handed to the frozen network at once
SCORE_CHUNK = 128  # images scored at once, every view (OpenVINO; a step of the progress bar)
HEAD_L2 = 1e-3  # linear recipe: L2 penalty of the head on standardised features
FINETUNE_CALIBRATION_FOLDS = 3  # a fine-tuned network's out-of-fold calibration: each fold a whole training
CALIBRATE_OOF_BELOW = 25  # out-of-fold calibration below this many images in the smallest class (see calibrate)


@dataclass
class Plan:
    strategy: str
    reason: str
    frozen: int  # stages [0, frozen) are frozen
    views: int
    epochs: int


@dataclass
class History:
    rows: list[dict] = field(default_factory=list)

    def add(self, **row):
        self.rows.append(row)


@dataclass
class TrainResult:
    """What `train` made and did: the trained model, the plan it followed, per-epoch
    history, timings, the epoch whose weights were kept (None without validation), auto's
    cross-validated scores of head inputs, whether Ctrl-C ended it early, and the linear
    recipe's bank (bank, labels, images) for calibration to refit the head on, fold by fold."""
    plan: Plan
    history: History
    timings: dict[str, float]
    best_epoch: int | None = None
    auto_cv: dict | None = None
    interrupted: bool = False
    model: Classifier | None = None
    linear_bank: tuple | None = None
    unlabelled: dict | None = None      # what --unlabelled did (train/unlabelled.py)
    guard: dict | None = None           # the anomaly model guarding the classifier (train/guard.py)


def resolve_strategy(cfg: TrainConfig, per_class_min: int) -> tuple[str, str]:
    if cfg.strategy != "auto":
        return cfg.strategy, f"strategy '{cfg.strategy}' as requested"
    if cfg.weights == "none":
        return "scratch", "auto: no pretrained weights, so the whole network is trained (scratch)"
    if per_class_min < AUTO_LINEAR_BELOW:
        return "linear", (f"auto: smallest class has {per_class_min} image(s) (< {AUTO_LINEAR_BELOW}); "
                          "a linear head on frozen features is the most reliable recipe")
    return "finetune", (f"auto: smallest class has {per_class_min} images; head on frozen features, then "
                        "fine-tune the deepest stages at a 10x smaller learning rate")


def view_bank(run: FrozenForward, x: np.ndarray, group: tuple[int, ...], aug: Augmenter, views: int,
              progress=None, dtype=torch.float32) -> torch.Tensor:
    """The frozen network's outputs for `views` versions of every image, view by view
    (views x N rows, view-major): the orientations of `group` first (identity, half turn,
    quarter turns, mirrored), exactly, then randomly augmented copies. The one place
    the view bank is built: training and the studies share it."""
    outputs = []
    for v in range(views):
        for s in range(0, len(x), BANK_CHUNK):
            batch = x[s:s + BANK_CHUNK]
            if v < len(group):
                batch = orient_batch(batch, group[v])
            else:
                batch = np.stack([aug(im) for im in batch])
            outputs.append(run.map(batch, progress=progress).to("cpu", dtype))
    return torch.cat(outputs)


def auto_views(cfg: TrainConfig, n_train: int, linear: bool = False, group: int = 8) -> int:
    """Views per image in the bank. The linear recipe takes the image's allowed flips and
    turns and nothing random: on NEU at 10 images per class, adding randomly augmented
    copies (affine, brightness/contrast, blur, noise) cost 0.3 points and made the weakest
    draw worse (README); fine-tuning gets the flips and turns plus augmented copies."""
    budget = max(2, VIEWS_BUDGET // max(n_train, 1))
    return cfg.views or int(min(group, budget) if linear and group > 1 else min(16, budget))


def make_plan(cfg: TrainConfig, strategy: str, reason: str, n_stages: int, default_unfreeze: int,
              n_train: int, group: int = 8) -> Plan:
    if strategy == "linear":
        frozen = n_stages
    elif strategy == "finetune":
        unfreeze = default_unfreeze if cfg.unfreeze == "auto" else (
            n_stages if cfg.unfreeze == "all" else int(cfg.unfreeze))
        frozen = max(n_stages - unfreeze, 0)
    else:
        frozen = 0
    # else images are augmented on the fly
    views = auto_views(cfg, n_train, strategy == "linear", group) if frozen > 0 else 1
    default_epochs = {"linear": 1, "finetune": 12, "full": 30, "scratch": 60}[strategy]
    epochs = cfg.epochs or default_epochs
    return Plan(strategy, reason, frozen, views, epochs)


@dataclass(frozen=True)
class Run:
    """What every step of one training needs and never changes: the options, the classes,
    the input spec, where it runs, and the backbone's entry."""
    cfg: TrainConfig
    classes: list
    spec: object
    device: torch.device
    dist: Dist
    progress: bool
    entry: object
    pretrained: bool

    def orientations(self) -> tuple[int, ...]:
        a = self.cfg.augment
        return orientations(a.flip, a.rot90, self.spec.height == self.spec.width)

    def test_views(self, strategy: str) -> tuple[int, ...] | None:
        """--tta: auto averages the flips/turns the augmentation allowed at prediction for the
        linear recipe (measured: +0.3 points at 10 NEU images per class, see README); on
        does so for every recipe; off, or orientation that matters, predicts on the image alone."""
        a = self.cfg.augment
        views = test_views(a.flip, a.rot90, self.spec.height == self.spec.width)
        if self.cfg.tta == "on" and not views:
            raise LinesideError("--tta on: test-time views are flips and turns, and --no-flip --no-rot90 "
                                "allows neither")
        if self.cfg.tta == "off" or (self.cfg.tta == "auto" and strategy != "linear"):
            return None
        return views or None

    def classifier(self, backbone, taps) -> Classifier:
        """A new head on `backbone` (on the stages `taps`, or the last), on the run's device."""
        return place(Classifier(backbone, self.entry.feature_dim, len(self.classes), self.spec, self.cfg.dropout,
                                taps=taps, pool=TAPS_POOL), self.device)

    def plan(self, strategy: str, reason: str, model: Classifier, n_train: int) -> Plan:
        return make_plan(self.cfg, strategy, reason, len(model.stages), self.entry.default_unfreeze, n_train,
                         len(self.orientations()))


def start(cfg: TrainConfig, classes, spec, progress: bool = True, dist: Dist | None = None,
          device: torch.device | None = None) -> tuple[Run, Classifier]:
    """The run and its untrained model: seeds set, the backbone built with its weights."""
    dist = dist or Dist()
    device = device or pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    weights = "none" if cfg.strategy == "scratch" else cfg.weights
    entry, backbone = build_backbone(cfg.backbone, weights)
    taps = resolve_taps(cfg.taps, len(backbone.stages))
    if taps and cfg.strategy != "linear":
        raise LinesideError(f"--taps {cfg.taps}: only with --strategy linear (the other recipes train the "
                            f"deepest stages, which a head on middle stages does not use)")
    run = Run(cfg, list(classes), spec, device, dist, progress and dist.main, entry, weights != "none")
    return run, run.classifier(backbone, taps)


def train(run: Run, model: Classifier, x_train: np.ndarray, y_train: np.ndarray, x_val=None,
          y_val=None) -> TrainResult:
    """The recipe, top to bottom: which one (auto's choice, a head on middle stages when
    cross-validation prefers it), its plan, then the head on a bank of frozen features
    (and the deepest stages fine-tuned on it) or the network trained end to end. Returns
    the trained model with what was done (TrainResult)."""
    counts = np.bincount(y_train, minlength=len(run.classes))
    if counts.min() == 0:
        missing = [c for c, n in zip(run.classes, counts) if n == 0]
        raise LinesideError(f"no training images for class(es) {', '.join(missing)}")
    strategy, reason = resolve_strategy(run.cfg, int(counts.min()))
    auto_cv = None
    if run.cfg.strategy == "auto" and strategy == "finetune" and run.cfg.taps == "last":
        strategy, reason, auto_cv, taps = auto_head(run, model, x_train, y_train, strategy, reason, x_val is None)
        if taps is not None:
            model = run.classifier(model.backbone, taps)
    plan = run.plan(strategy, reason, model, len(y_train))
    result = TrainResult(plan, History(), {}, auto_cv=auto_cv, model=model)
    log.info("%s", reason)
    if run.progress:       # before the work: what will be trained, and auto's estimate of its time
        tqdm.write(f"plan: {plan.strategy}, {plan.epochs} epoch(s); {reason}", file=sys.stderr)
    if plan.frozen > 0:
        result.linear_bank = fit_on_bank(run, result, x_train, y_train, x_val, y_val)
    else:
        fit_end_to_end(run, result, x_train, y_train, x_val, y_val)
    model.views = run.test_views(plan.strategy)
    model.eval()
    return result


def auto_head(run: Run, model: Classifier, x_train, y_train, strategy: str, reason: str,
              calibrate_out_of_fold: bool) -> tuple[str, str, dict, tuple[int, ...] | None]:
    """auto, with enough images to fine-tune: auto.choose_head, the fine-tuning estimated
    when --time-budget applies (not under torchrun). Returns the strategy, why, the
    cross-validated scores and the stages a head should take (None: the last)."""
    budget = run.cfg.time_budget
    estimate = None if not budget or run.dist.active else (
        lambda: finetune_estimate(run, model, x_train, y_train, calibrate_out_of_fold))
    return choose_head(model, x_train, y_train, run.device, run.cfg.seed, budget, estimate, strategy, reason)


def finetune_estimate(run: Run, model: Classifier, x_train, y_train, calibrate_out_of_fold: bool) -> tuple[float, int]:
    """auto.estimate_finetune_s of the fine-tuning recipe this run would follow, times the
    out-of-fold calibration's trainings when they will run (k folds, each on (k - 1)/k of
    the images: k - 1 more). Returns the seconds and k (0 without them)."""
    plan = run.plan("finetune", "", model, len(y_train))
    seconds = estimate_finetune_s(model, x_train, y_train, plan.frozen, plan.views, plan.epochs,
                                  run.cfg.batch_size, run.device)
    folds = 0
    counts = np.bincount(y_train)
    if calibrate_out_of_fold and run.cfg.calibrate == "auto" and counts[counts > 0].min() < CALIBRATE_OOF_BELOW:
        from .calibrate import stratified_folds

        folds = stratified_folds(y_train, run.cfg.seed, FINETUNE_CALIBRATION_FOLDS)[1]
    return seconds * max(1, folds), folds


# -- frozen trunk: cache activations of augmented views once --------------------------

def fit_on_bank(run: Run, result: TrainResult, x_train, y_train, x_val, y_val):
    """The head on a bank of frozen activations, then (finetune) the deepest stages with it.
    Returns the linear recipe's bank (bank, labels, images), which calibration and
    --unlabelled's self-training refit its head on; None for the other recipes."""
    model, plan, timings = result.model, result.plan, result.timings
    t0 = time.perf_counter()
    bank, bank_y = build_bank(run, model, x_train, y_train, plan.frozen, plan.views)
    val_bank = build_bank(run, model, x_val, y_val, plan.frozen, 1)[0] if x_val is not None else None
    timings["bank_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    fit_head(run, model, bank, bank_y, plan.frozen)
    timings["head_s"] = time.perf_counter() - t0
    # a linear head without validation images: calibration refits it on this bank's rows, fold by fold
    linear = plan.frozen >= len(model.stages)
    kept = (bank, bank_y, len(y_train)) if linear else None      # calibration and --unlabelled refit on it
    val = evaluate_bank(run, model, val_bank, y_val, plan.frozen)
    result.history.add(stage="head", epoch=0, train_loss=float("nan"), lr=0.0, **val,
                       seconds=round(timings["head_s"], 2))
    if linear:
        return kept  # linear: the head is all there is
    banks = [bank, val_bank]
    del bank, val_bank          # finetune_on_bank holds the only references: each is freed once moved
    finetune_on_bank(run, result, banks, bank_y, y_train, y_val)
    return kept


def finetune_on_bank(run: Run, result: TrainResult, banks: list, bank_y, y_train, y_val) -> None:
    """The deepest stages and the head trained on the bank, at a tenth of the learning
    rate. `banks`: [training bank, validation bank or None], emptied here."""
    model, plan, cfg = result.model, result.plan, run.cfg
    trainable = list(model.stages[plan.frozen:].parameters()) + list(model.head.parameters())
    n = len(bank_y)

    # the bank and its labels where the steps run (pinned host memory for a bank too large
    # for the GPU), each epoch's order copied there once: no step waits on a copy
    val_bank = banks.pop()
    bank_t = resident(banks.pop(), run.device)
    val_bank = resident(val_bank, run.device) if val_bank is not None else None
    y_t = torch.from_numpy(bank_y).to(run.device)

    def batches(rng):
        steps = list(epoch_indices(bank_y, rng, cfg.batch_size, cfg.balance,
                                   same_size=run.device.type == "cuda"))   # one shape: one set of kernels
        for xb, yb in device_batches(bank_t, y_t, steps, run.device):
            yield xb.float(), yb

    def forward(h):
        return model.head(model.dropout(model.features(h, plan.frozen)))

    t0 = time.perf_counter()
    fit_epochs_of(run, result, [{"params": trainable, "lr": cfg.lr / 10}],
                  steps_per_epoch=math.ceil(n / cfg.batch_size), batches=batches, forward=forward,
                  validate=lambda: evaluate_bank(run, model, val_bank, y_val, plan.frozen), stage="finetune",
                  y=y_train)
    result.timings["finetune_s"] = time.perf_counter() - t0


def build_bank(run: Run, model: Classifier, x, y, frozen: int, views: int):
    """Trunk activations (pooled features when every stage is frozen) for `views`
    versions of every image (view_bank), with their labels. The frozen part runs
    through FrozenForward (OpenVINO on the CPU for large banks)."""
    model.eval()
    pooled = frozen >= len(model.stages)      # nothing left to train but the head: pool now
    if pooled:
        forward = frozen_forward(model, model.embed, "embed", x[:1], run.device, len(x) * views,
                                 depends=embed_tensors(model))
    else:
        forward = FrozenForward(model, lambda t: model.trunk(t, frozen), x[:1], run.device, len(x) * views)
    with tqdm(total=len(x) * views, desc="caching frozen features", unit="img", disable=not run.progress,
              leave=False) as bar:
        # half precision halves the memory of a feature-map bank; the tail trains in float32
        bank = view_bank(forward, x, run.orientations(), Augmenter(run.cfg.augment, run.cfg.seed + 1), views,
                         bar.update, torch.float32 if pooled else torch.float16)
    return bank, np.tile(np.asarray(y), views).astype(np.int64)


def evaluate_bank(run: Run, model: Classifier, bank, y, frozen) -> dict:
    """Validation metrics of the model on a bank of trunk activations, in the training's
    batch size and mixed precision (on CUDA the kernels its steps set up, one shape)."""
    if bank is None:
        return {}
    model.eval()
    amp, out = Amp(run.device), []
    with torch.inference_mode():
        for hb, real in row_batches(bank, run.cfg.batch_size, run.device):
            with amp.autocast():
                out.append(model.head(model.features(hb.float(), frozen))[:real].float())
    return val_metrics(torch.cat(out).cpu(), y)


def fit_head(run: Run, model: Classifier, bank, y, frozen: int):
    """The head as a multinomial logistic regression on pooled features (fit_linear_head).

    A head on middle stages (linear --taps) is fitted on standardised features (every
    feature on one scale, L2 of HEAD_L2) and the scaling is folded back into its
    weights: on NEU (10 images per class, five draws) that beat the raw fit by 0.1
    points on single images and 0.3 with test-time views. On the last stage (1280
    pooled features, many nearly constant) it did much worse: 65.5% instead of over
    80% in tests/test_neu.py; that head, and the one fitted before fine-tuning, use the
    raw features (L2 as in C=1). Class weights follow --balance loss."""
    model.eval()
    with torch.inference_mode():      # batches of one shape (row_batches): one set of kernels on CUDA
        feats = torch.cat([model.features(hb.float(), frozen)[:real].float()
                           for hb, real in row_batches(bank, INFER_BATCH, run.device)])
    fit_head_on(run, model, model.head, feats.clone(), y, frozen)


def fit_head_on(run: Run, model: Classifier, head: torch.nn.Linear, feats: torch.Tensor, y: np.ndarray,
                frozen: int) -> None:
    """fit_head's regression of `head` on pooled features `feats` (rows labelled y)."""
    standardise = frozen >= len(model.stages) and bool(model.taps)
    counts = np.bincount(y, minlength=len(run.classes))
    weight = class_weights(counts).to(run.device) if run.cfg.balance == "loss" else None
    fit_linear_head(head, feats, torch.from_numpy(y).to(run.device),
                    HEAD_L2 if standardise else 0.5 / len(y), standardise, weight,
                    max_iter=500 if standardise else 300)


# -- end to end: augment images on the fly ------------------------------------------

def fit_end_to_end(run: Run, result: TrainResult, x_train, y_train, x_val, y_val) -> None:
    """full, scratch, and finetune with every stage unfrozen (its head first, on frozen
    features): the images augmented as they are drawn."""
    model, plan, cfg = result.model, result.plan, run.cfg
    aug = Augmenter(cfg.augment, cfg.seed + 2)
    head_params = list(model.head.parameters())
    body_params = list(model.backbone.parameters())
    if plan.strategy == "finetune":  # --unfreeze all: the head still comes first, on frozen features
        n = len(model.stages)
        t0 = time.perf_counter()
        fit_head(run, model, *build_bank(run, model, x_train, y_train, n, auto_views(cfg, len(y_train))), n)
        result.timings["head_s"] = time.perf_counter() - t0
        groups = [{"params": body_params + head_params, "lr": cfg.lr / 10}]
    else:
        body_lr = cfg.lr if plan.strategy == "scratch" else cfg.lr / 10
        groups = [{"params": body_params, "lr": body_lr}, {"params": head_params, "lr": cfg.lr}]
    batches = image_batches(run, x_train, y_train, aug)

    # Validation as training runs: the images on the device once, batches of the training
    # batch size (the last one filled up), its mixed precision and layout: on CUDA
    # the same convolution kernels as the training steps, no new ones to set up.
    val_t = device_images(x_val, run.device) if x_val is not None else None
    val_amp = Amp(run.device)

    def validate():
        if val_t is None:
            return {}
        return val_metrics(device_logits(model, val_t, cfg.batch_size, val_amp), y_val)

    t0 = time.perf_counter()
    forward = distributed.wrap(model, run.dist, run.device)   # data-parallel under torchrun
    steps = math.ceil(math.ceil(len(y_train) / run.dist.world) / cfg.batch_size)
    fit_epochs_of(run, result, groups, steps_per_epoch=steps, batches=batches, forward=forward,
                  validate=validate, stage=plan.strategy, y=y_train)
    if not run.pretrained or cfg.bn_stats == "adapt":
        recompute_bn_stats(run, model, x_train, aug)
    result.timings["train_s"] = time.perf_counter() - t0


def image_batches(run: Run, x_train, y_train, aug: Augmenter):
    """batches(rng) -> (images, labels) on the device for one epoch, augmented: a whole
    batch at a time on the device where that pays, else image by image on the host."""
    cfg = run.cfg
    if batch_augment(run.device):
        # Every image decoded once into a uint8 tensor, kept on the device when it fits
        # (pinned on the host otherwise), augmented a whole batch at a time where it lies.
        images_t, targets_t = device_images(x_train, run.device), torch.from_numpy(y_train).to(run.device)
        batch_aug = BatchAugmenter(cfg.augment, run.spec.height == run.spec.width, cfg.seed + 2)

        def batches(rng):
            steps = list(epoch_indices(y_train, rng, cfg.batch_size, cfg.balance, run.dist, same_size=True))
            for xb, yb in device_batches(images_t, targets_t, steps, run.device):
                yield in_layout(batch_aug(xb.permute(0, 3, 1, 2).float())), yb
        return batches

    def batches(rng):
        for idx in epoch_indices(y_train, rng, cfg.batch_size, cfg.balance, run.dist):
            images = np.stack([aug(x_train[i]) for i in idx])
            yield to_tensor(images, run.device), torch.from_numpy(y_train[idx]).to(run.device)
    return batches


@torch.no_grad()
def recompute_bn_stats(run: Run, model: Classifier, x_train, aug, views: int = 4):
    """BatchNorm statistics trained along with the weights lag behind them: after a
    short schedule from scratch, eval mode can collapse to one class. Recompute them
    as exact averages over the training images (plain and augmented) at the final weights."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for m in bns:
        m.reset_running_stats()
        m.momentum = None            # cumulative average over every batch below
        m.train()
    for v in range(views):
        for s in range(0, len(x_train), INFER_BATCH):
            batch = x_train[s:s + INFER_BATCH]
            if v > 0:
                batch = np.stack([aug(im) for im in batch])
            if len(batch) > 1:
                model(to_tensor(batch, run.device))
    for m in bns:
        m.momentum = 0.1
    model.eval()


def fit_epochs_of(run: Run, result: TrainResult, groups: list[dict], steps_per_epoch: int, batches, forward,
                  validate, stage: str, y) -> None:
    """loop.fit_epochs with this run's options; its best epoch and interruption go to the result."""
    cfg, plan = run.cfg, result.plan
    weight = class_weights(np.bincount(y, minlength=len(run.classes))).to(run.device) \
        if cfg.balance == "loss" else None
    best, interrupted = fit_epochs(
        result.model, groups, epochs=plan.epochs, steps_per_epoch=steps_per_epoch, batches=batches,
        forward=forward, validate=validate, stage=stage, frozen=plan.frozen, weight=weight,
        label_smoothing=cfg.label_smoothing, weight_decay=cfg.weight_decay, patience=cfg.patience,
        seed=cfg.seed, freeze_bn=run.pretrained and cfg.bn_stats == "freeze", device=run.device,
        dist=run.dist, history=result.history, progress=run.progress)
    if best is not None:
        result.best_epoch = best
    result.interrupted = result.interrupted or interrupted


# -- calibration ---------------------------------------------------------------------

def calibrate_temperature(run: Run, result: TrainResult, x_train, y_train, x_val=None, y_val=None) -> dict | None:
    """Fit a temperature (train/calibrate.py) and fold it into the head: on the
    validation images when there are some, else on out-of-fold predictions of the
    training images (the recipe trained again on all folds but one, or a linear head
    refitted on the training bank's rows), in the few-shot case only (smallest class
    under CALIBRATE_OOF_BELOW images): beyond that, k more trainings cost more than a
    validation split would. Returns the report (the probabilities before and after
    under "_probs"), or None when there is nothing to fit it on."""
    from .calibrate import calibration_report

    model = result.model
    if x_val is not None and len(y_val):
        logits = score(model, x_val, run.device, logits=True)
        y, source = np.asarray(y_val), f"the {len(y_val)} validation images"
    else:
        logits, k = out_of_fold_logits(run, result, x_train, y_train)
        if logits is None:
            return None
        torch.manual_seed(run.cfg.seed)
        y, source = np.asarray(y_train), f"out-of-fold predictions of the {len(y_train)} training images ({k} folds)"
    report = calibration_report(logits, y, source)
    with torch.no_grad():
        model.head.weight.div_(report["temperature"])
        model.head.bias.div_(report["temperature"])
    return report


def out_of_fold_logits(run: Run, result: TrainResult, x_train, y_train) -> tuple[np.ndarray | None, int]:
    """Logits of every training image from a model that did not train on it, and the
    number of folds; (None, k) when the classes are too large (or too small) for it."""
    from .calibrate import stratified_folds

    model, plan = result.model, result.plan
    counts = np.bincount(y_train)
    # a head on frozen features refits in seconds: 5 folds; a network trained end to
    # end costs a whole training per fold: 3 (elpv, 20 cells per class: with 5
    # fine-tuned folds `lineside train` took 350 s in all)
    fold, k = stratified_folds(y_train, run.cfg.seed, 5 if plan.frozen >= len(model.stages)
                               else FINETUNE_CALIBRATION_FOLDS)
    if k < 2 or counts[counts > 0].min() >= CALIBRATE_OOF_BELOW:
        return None, k
    saved, result.linear_bank = result.linear_bank, None   # used once, then freed
    logits = out_of_fold_on_bank(run, model, saved, fold, k)
    if logits is not None:
        return logits, k
    taps = ",".join(str(t) for t in model.taps) if model.taps else "last"
    cfg = run.cfg.override(strategy=plan.strategy, taps=taps)
    logits = np.zeros((len(y_train), len(run.classes)), np.float32)
    for f in tqdm(range(k), desc="calibrating (out-of-fold)", unit="fold", disable=not run.progress, leave=False):
        tr, te = fold != f, fold == f
        fold_run, fold_model = start(cfg, run.classes, run.spec, progress=False, device=run.device)
        fitted = train(fold_run, fold_model, x_train[tr], y_train[tr])
        if fitted.interrupted:      # Ctrl-C in a fold's training: the user wants the run to end now
            log.warning("interrupted during calibration: the trained model is kept, uncalibrated")
            result.interrupted = True
            return None, k
        logits[te] = score(fitted.model, x_train[te], run.device, logits=True)
    return logits, k


def out_of_fold_on_bank(run: Run, model: Classifier, saved, fold: np.ndarray, k: int) -> np.ndarray | None:
    """Out-of-fold logits of a linear head without a pass through the network: the
    training run's bank (`saved`: bank, labels, images) already holds every training
    image's pooled features for its flips and turns, so each fold's head is fitted on
    the other images' rows (as a run on those images alone would fit it) and predicts
    its images from the rows of the views the model averages. None without a bank, or
    when it lacks one of those views (the recipe is then trained again per fold). A
    fourth entry of `saved` (`refit(features, labels) -> head`: --unlabelled's
    self-training) fits each fold's head instead."""
    if saved is None:
        return None
    bank, bank_y, n = saved[:3]
    refit = saved[3] if len(saved) > 3 else None
    group = run.orientations()
    views = model.views or (0,)
    rows = [group.index(v) for v in views if v in group]
    if len(rows) != len(views) or max(rows) * n >= len(bank) or len(bank) % n:
        return None
    frozen = len(model.stages)
    tiled = np.tile(np.arange(n), len(bank) // n)
    logits = np.zeros((n, len(run.classes)), np.float32)
    for f in range(k):
        held = np.flatnonzero(fold == f)
        keep = torch.from_numpy(np.flatnonzero(fold[tiled] != f))
        rows_f, y_f = bank[keep].to(run.device).float(), bank_y[keep.numpy()]
        if refit is not None:
            head = refit(rows_f, y_f)
        else:
            head = torch.nn.Linear(bank.shape[1], len(run.classes)).to(run.device)
            fit_head_on(run, model, head, rows_f, y_f, frozen)
        with torch.no_grad():
            feats = torch.stack([bank[torch.from_numpy(r * n + held)] for r in rows]).float().mean(0)
            logits[held] = head(feats.to(run.device)).cpu().numpy()
    return logits


class Trainer:
    """The steps above behind one object, for the studies and the tests: start() on
    construction, train() in fit, calibrate_temperature() in calibrate."""

    def __init__(self, cfg: TrainConfig, classes, spec, progress: bool = True, dist: Dist | None = None,
                 device: torch.device | None = None):
        self.run, self.model = start(cfg, classes, spec, progress, dist, device)
        self.result: TrainResult | None = None

    cfg = property(lambda self: self.run.cfg)
    classes = property(lambda self: self.run.classes)
    spec = property(lambda self: self.run.spec)
    device = property(lambda self: self.run.device)

    def fit(self, x_train: np.ndarray, y_train: np.ndarray, x_val=None, y_val=None) -> TrainResult:
        self.result = train(self.run, self.model, x_train, y_train, x_val, y_val)
        self.model = self.result.model
        return self.result

    def calibrate(self, x_train, y_train, plan: Plan, x_val=None, y_val=None) -> dict | None:
        """calibrate_temperature on the last fit (whose plan is `plan`)."""
        if self.result is None or plan is not self.result.plan:
            raise ValueError("Trainer.calibrate: give the plan of the last fit (calibration refits that model)")
        return calibrate_temperature(self.run, self.result, x_train, y_train, x_val, y_val)

    def orientations(self) -> tuple[int, ...]:
        return self.run.orientations()

    def test_views(self, strategy: str) -> tuple[int, ...] | None:
        return self.run.test_views(strategy)

    def build_bank(self, x, y, frozen: int, views: int):
        return build_bank(self.run, self.model, x, y, frozen, views)

    def fit_head(self, bank, y, frozen: int):
        fit_head(self.run, self.model, bank, y, frozen)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return score(self.model, x, self.device)


@torch.inference_mode()
def predict_proba(model: Classifier, x: np.ndarray, device=None, progress: bool = False,
                  batch_size: int = INFER_BATCH) -> np.ndarray:
    """Class probabilities for uint8 images (N x H x W x 3 at the model's input size)."""
    device = device or next(model.parameters()).device
    model.eval()
    out = []
    with exact_fp32():
        for s in tqdm(range(0, len(x), batch_size), desc="predicting", unit="batch", disable=not progress,
                      leave=False):
            out.append(torch.softmax(model(to_tensor(x[s:s + batch_size], device)).float(), 1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, n_classes(model)), np.float32)


def n_classes(model) -> int:
    return int(getattr(model, "num_classes", 0) or model.head.out_features)


def score(model: Classifier, x: np.ndarray, device=None, progress=None, logits: bool = False) -> np.ndarray:
    """Class probabilities (or with `logits`, the logits) of a finished model for uint8
    images (N x H x W x 3), as fast as the device allows (FrozenForward: on the CPU,
    OpenVINO for large jobs). Identical to predict_proba within 1e-5; predict_proba stays
    for a model that is still training."""
    device = torch.device(device or next(model.parameters()).device)
    if len(x) == 0:
        return np.zeros((0, n_classes(model)), np.float32)
    if getattr(model, "task", None) == "anomaly":   # its own batched torch forward (train/anomaly.py)
        from .anomaly import anomaly_logits

        z = anomaly_logits(model, x, device, progress)
        return z if logits else torch.softmax(torch.from_numpy(z), 1).numpy()
    views = model.views or (0,)
    if backend_for(device, len(x) * len(views), x.shape[1:3]) != "openvino" or not hasattr(model, "embed"):
        out = (lambda t: model(t).float()) if logits else (lambda t: torch.softmax(model(t).float(), 1))
        return FrozenForward(model, out, x[:1], device, len(x) * len(views)).map(x, progress).numpy()
    # In OpenVINO the single-view network is converted, once (with four views in its graph
    # converting took 8.5 s on a 2-core CPU, without 3.4 s; the bank of a linear run already
    # converted it): the views are turned here and their features averaged as
    # Classifier.forward averages them, then the head runs in PyTorch.
    feats = view_features(model, x, device, progress)
    with torch.inference_mode():
        z = model.head(feats.to(next(model.head.parameters()).device)).float()
    return (z if logits else torch.softmax(z, 1)).cpu().numpy()


def view_features(model: Classifier, x: np.ndarray, device, progress=None) -> torch.Tensor:
    """The pooled features a Classifier's head reads, averaged over its test-time views
    (Classifier.forward's average), SCORE_CHUNK images at a time; on the CPU for large jobs
    through the OpenVINO conversion the bank already made (frozen_forward)."""
    views = model.views or (0,)
    run = frozen_forward(model, model.embed, "embed", x[:1], device, len(x) * len(views),
                         depends=embed_tensors(model))
    feats = []
    for s in range(0, len(x), SCORE_CHUNK):
        chunk = x[s:s + SCORE_CHUNK]
        feats.append(sum(run.map(orient_batch(chunk, k)) for k in views).float() / len(views))
        if progress is not None:
            progress(len(chunk))
    return torch.cat(feats)
