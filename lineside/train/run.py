"""`lineside train`: data folder in, run folder out (lineside.runs names its files)."""

from __future__ import annotations

import csv
import json
import logging
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import lineside
from lineside import runs
from lineside.dataset import ImageSet, load_arrays, load_image_set, stratified_split
from lineside.errors import LinesideError
from lineside.metrics import classification_report
from lineside.runs import RunFolder, TrainedInfo

from . import distributed
from .backbones import BACKBONES
from .checkpoint import save_checkpoint
from .config import TrainConfig
from .data import layout
from .plots import plot_confusion
from .trainer import calibrate_temperature, score, start, train
from .unlabelled import UnlabelledSteps, good_class, unlabelled_paths

log = logging.getLogger(__name__)

AUTO_VAL_MIN_PER_CLASS = 25


def gpu_name(device: torch.device) -> str | None:
    """The name of the CUDA GPU `device` is (metrics.json and the summary), else None."""
    if device.type != "cuda":
        return None
    try:
        return torch.cuda.get_device_name(device)
    except (RuntimeError, AssertionError):     # a driver that cannot say: the run stands without the name
        return None


def split_data(images: ImageSet, cfg: TrainConfig, val_path=None) -> tuple[ImageSet, ImageSet | None, str]:
    if val_path is not None:
        return images, load_image_set(val_path, classes=list(images.classes)), f"validation folder {val_path}"
    smallest = min(images.counts().values())
    fraction = cfg.val_fraction
    if fraction is None:
        fraction = 0.2 if smallest >= AUTO_VAL_MIN_PER_CLASS else 0.0
    if fraction == 0:
        why = (f"no validation split (smallest class has {smallest} images, < {AUTO_VAL_MIN_PER_CLASS}): "
               "every image trains, for a fixed schedule" if cfg.val_fraction is None else "no validation split")
        return images, None, why
    train_idx, val_idx = stratified_split(images.targets, fraction, cfg.seed)
    if len(val_idx) == 0:
        return images, None, "no validation split (classes too small)"
    return images.subset(train_idx), images.subset(val_idx), f"{fraction:.0%} of each class held out for validation"


def train_run(data, out, cfg: TrainConfig, val=None, progress: bool = True, unlabelled=None,
              ok_classes=None, guard: float | None = None) -> dict:
    """Train on `data` and write a run folder to `out`. Returns the metrics dict. Under
    torchrun every process trains (see distributed.py) and rank 0 alone writes.
    `unlabelled`: a folder of images without labels to learn from too (train/unlabelled.py);
    `guard`: the false-reject rate of an anomaly model of the good class guarding the
    classifier (train/guard.py); `ok_classes` names the good class when no folder is
    called good, ok, pass, normal, ... (anomaly_run.DEFAULT_OK)."""
    dist = distributed.from_env()
    device = distributed.setup(dist, cfg.device)
    try:
        return _train_run(data, Path(out), cfg, val, progress and dist.main, dist, device,
                          _Extras(unlabelled, ok_classes, guard))
    finally:
        distributed.teardown(dist)


@dataclass(frozen=True)
class _Extras:
    """What a run adds to the recipe: unlabelled images, a guard, and the good class they need."""
    unlabelled: Path | None = None
    ok_classes: object = None
    guard: float | None = None


@dataclass
class _Data:
    """The run's images, read: training and validation arrays, and what was skipped."""
    images: ImageSet
    train_set: ImageSet
    val_set: ImageSet | None
    split_note: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    bad: list


def _train_run(data, out: Path, cfg: TrainConfig, val, progress: bool, dist, device, extras: _Extras) -> dict:
    """Read the images, train (trainer.start, train, then _after_training), score, and
    (rank 0) write the run folder."""
    t_start = time.perf_counter()
    spec = BACKBONES.get(cfg.backbone).input_spec.with_size(cfg.image_size)
    if extras.unlabelled is not None:
        unlabelled_paths(extras.unlabelled)      # a wrong folder is said before any training
    d = _read(data, out, cfg, val, spec, progress, dist)
    read_s = time.perf_counter() - t_start
    ok = good_class(d.images.classes, extras.ok_classes) \
        if extras.guard is not None or extras.ok_classes is not None else None
    if extras.guard is not None and ok is None:          # before any training
        raise LinesideError("--guard: no good class among the labels (name it with --ok-classes)")

    t0 = time.perf_counter()
    run, model = start(cfg, d.images.classes, spec, progress, dist=dist, device=device)
    setup_s = time.perf_counter() - t0
    result = train(run, model, d.x_train, d.y_train, d.x_val, d.y_val)
    calibration = _after_training(run, result, d, extras, ok) if dist.main else None
    train_seconds = time.perf_counter() - t_start

    t0 = time.perf_counter()
    report, cm_report, cm_title = _scored(run, result, d, calibration)
    score_s = time.perf_counter() - t0
    # total: reading to calibration; then the final scoring and (below) writing the run folder
    seconds = {"total": round(train_seconds, 2), "read_s": round(read_s, 2), "setup_s": round(setup_s, 2),
               **{k: round(v, 2) for k, v in result.timings.items()}, "score_s": round(score_s, 2)}
    metrics = _metrics(data, cfg, run, result, d, spec, report, calibration, cm_report, seconds)
    if dist.main:
        _write_run(out, cfg, run, result, d, spec, metrics, report, calibration, cm_report, cm_title)
    return metrics


def _after_training(run, result, d: _Data, extras: _Extras, ok: int | None) -> dict | None:
    """Self-training on unlabelled images, the temperature, the good parts among the
    unlabelled images, and the guard, each when asked for. Returns the calibration."""
    unl = UnlabelledSteps(run, result, d, extras.unlabelled, extras.ok_classes) \
        if extras.unlabelled is not None else None
    if unl is not None:
        unl.self_train()
    calibration = None
    if run.cfg.calibrate == "auto":
        t0 = time.perf_counter()
        calibration = calibrate_temperature(run, result, d.x_train, d.y_train, d.x_val, d.y_val)
        result.timings["calibrate_s"] = time.perf_counter() - t0
    if unl is not None:
        calibration = unl.good_parts(calibration)
    if extras.guard is not None:
        from .guard import add_guard

        t0 = time.perf_counter()
        result.model, calibration, result.guard = add_guard(run, result.model, d.x_train, d.y_train, ok,
                                                            extras.guard, calibration)
        result.timings["guard_s"] = time.perf_counter() - t0
    return calibration


def _read(data, out: Path, cfg: TrainConfig, val, spec, progress: bool, dist) -> _Data:
    images = load_image_set(data)
    train_set, val_set, split_note = split_data(images, cfg, val)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.dump(out / runs.CONFIG)  # written first, so a failed run still says what it tried
    x_train, train_set, bad = load_arrays(train_set, spec, cfg.skip_bad, progress, "reading training images")
    x_val = y_val = None
    if val_set is not None:
        x_val, val_set, bad_val = load_arrays(val_set, spec, cfg.skip_bad, progress, "reading validation images")
        y_val = np.asarray(val_set.targets, dtype=np.int64)
        bad += bad_val
    y_train = np.asarray(train_set.targets, dtype=np.int64)
    return _Data(images, train_set, val_set, split_note, x_train, y_train, x_val, y_val, bad)


def _scored(run, result, d: _Data, calibration) -> tuple[dict | None, dict, str]:
    """The validation report (None without validation images), and the confusion matrix's
    report and title: validation's, the out-of-fold answers', or the training images'."""
    classes = labels_of(result, d)
    if d.x_val is not None:
        probs = score(result.model, d.x_val, run.device)
        report = classification_report(d.y_val, probs.argmax(1), classes)
        return report, report, f"validation ({len(d.y_val)} images)"
    if calibration and calibration["source"].startswith("out-of-fold"):
        # the images predicted by models that did not train on them: a picture of new parts,
        # where the training images themselves would draw a perfect diagonal
        return None, classification_report(calibration["_y"], np.asarray(calibration["_logits"]).argmax(1),
                                           classes), \
            f"out of fold ({len(calibration['_y'])} training images, each by a model that did not see it)"
    probs = score(result.model, d.x_train, run.device)
    return None, classification_report(d.y_train, probs.argmax(1), classes), \
        f"training images ({len(d.y_train)}; no validation split)"


def _metrics(data, cfg: TrainConfig, run, result, d: _Data, spec, report, calibration, cm_report,
             seconds: dict) -> dict:
    """metrics.json: what was trained, how, on what, and how well."""
    return {
        "lineside_version": lineside.__version__,
        "backbone": cfg.backbone,
        "weights": cfg.weights if result.plan.strategy != "scratch" else "none",
        "strategy": result.plan.strategy,
        "strategy_reason": result.plan.reason,
        "auto_cross_validation": result.auto_cv,
        "plan": {"frozen_stages": result.plan.frozen, "total_stages": len(result.model.stages),
                 "views": result.plan.views, "epochs": result.plan.epochs,
                 "test_views": list(views) if (views := getattr(result.model, "classifier", result.model).views)
                 else None,
                 "best_epoch": result.best_epoch},
        "interrupted": result.interrupted,
        "device": str(run.device),
        "processes": run.dist.world,
        "threads": torch.get_num_threads(),
        "input_spec": spec.to_dict(),
        "labels": labels_of(result, d),
        "train_counts": d.train_set.counts(),
        "val_counts": d.val_set.counts() if d.val_set is not None else None,
        "split": d.split_note,
        "validation_images": runs.VALIDATION if d.val_set is not None else None,
        "data": str(Path(data).resolve()),
        "data_fingerprint": d.images.fingerprint(),
        "skipped_images": d.bad,
        "validation": report,
        "calibration": {k: v for k, v in calibration.items() if not k.startswith("_")} if calibration else None,
        "unlabelled": result.unlabelled,
        "guard": result.guard,
        "training_set": None if report else cm_report,
        "seconds": seconds,
        "host": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
                 "gpu": gpu_name(run.device), "layout": layout(run.device)},
    }


def _write_run(out: Path, cfg: TrainConfig, run, result, d: _Data, spec, metrics: dict, report, calibration,
               cm_report, cm_title: str) -> None:
    """The run folder (lineside.runs names its files), metrics.json last."""
    t0 = time.perf_counter()
    trained = TrainedInfo(strategy=metrics["strategy"], weights=metrics["weights"],
                          data_fingerprint=metrics["data_fingerprint"], lineside_version=metrics["lineside_version"],
                          val_balanced_accuracy=report["balanced_accuracy"] if report else None,
                          reject_below=calibration["reject_below"] if calibration else None)
    save_checkpoint(out / runs.MODEL, result.model, labels_of(result, d), cfg.backbone, spec, trained)
    if d.val_set is not None:
        d.val_set.write_manifest(out / runs.VALIDATION)
    _write_history(out / runs.HISTORY, result.history.rows)
    plot_confusion(np.asarray(cm_report["confusion_matrix"]), labels_of(result, d), out / runs.CONFUSION, cm_title)
    if calibration:
        from .calibrate import reliability_diagram

        if calibration["source"].startswith("out-of-fold"):
            # what the model says of images it did not train on (calibrated): the INT8 gate's
            # picture of unseen images when nothing else is held out (export/bundle.py)
            np.savez(out / runs.OUT_OF_FOLD, logits=calibration["_logits"].astype(np.float32),
                     labels=np.asarray(calibration["_y"], np.int64))

        reliability_diagram(*calibration["_probs"], calibration["_y"], out / runs.CALIBRATION,
                            f"{calibration['source']}; temperature {calibration['temperature']:.2f}")
    metrics["confusion_matrix_of"] = cm_title
    metrics["seconds"]["write_s"] = round(time.perf_counter() - t0, 2)
    (out / runs.METRICS).write_text(json.dumps(metrics, indent=2))


def labels_of(result, d: _Data) -> list[str]:
    """The model's labels: the data's classes, and the label a guard adds (train/guard.py)."""
    return list(d.images.classes) + list(getattr(result.model, "extra_labels", ()))


def _write_history(path: Path, rows: list[dict]) -> None:
    columns = ["stage", "epoch", "train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy", "lr", "seconds",
               "train_seconds", "first_step_seconds"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            # a value there is none of (the head fitted by L-BFGS reports no per-epoch training
            # loss) is an empty cell, not "nan"
            w.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else
                            f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def check_out_dir(out: Path, force: bool) -> None:
    if RunFolder(out).holds_model() and not force:
        raise LinesideError(f"{out}: already holds a trained model; choose another --out or pass --force")
