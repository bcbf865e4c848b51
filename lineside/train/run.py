"""`lineside train`: data folder in, run folder out (lineside.runs names its files)."""

from __future__ import annotations

import csv
import json
import logging
import math
import platform
import time
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
from .trainer import Trainer

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


def train_run(data, out, cfg: TrainConfig, val=None, progress: bool = True) -> dict:
    """Train on `data` and write a run folder to `out`. Returns the metrics dict. Under
    torchrun every process trains (see distributed.py) and rank 0 alone writes."""
    dist = distributed.from_env()
    device = distributed.setup(dist, cfg.device)
    try:
        return _train_run(data, Path(out), cfg, val, progress and dist.main, dist, device)
    finally:
        distributed.teardown(dist)


def _train_run(data, out: Path, cfg: TrainConfig, val, progress: bool, dist, device) -> dict:
    t_start = time.perf_counter()
    images = load_image_set(data)
    train_set, val_set, split_note = split_data(images, cfg, val)
    spec = BACKBONES.get(cfg.backbone).input_spec.with_size(cfg.image_size)
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
    read_s = time.perf_counter() - t_start

    t0 = time.perf_counter()
    trainer = Trainer(cfg, images.classes, spec, progress, dist=dist, device=device)
    setup_s = time.perf_counter() - t0
    result = trainer.fit(x_train, y_train, x_val, y_val)
    plan = result.plan
    calibration = None
    if cfg.calibrate == "auto" and dist.main:
        t0 = time.perf_counter()
        calibration = trainer.calibrate(x_train, y_train, plan, x_val, y_val)
        result.timings["calibrate_s"] = time.perf_counter() - t0
    train_seconds = time.perf_counter() - t_start

    t0 = time.perf_counter()
    if x_val is not None:
        probs = trainer.predict_proba(x_val)
        report = classification_report(y_val, probs.argmax(1), images.classes)
        cm_title = f"validation ({len(y_val)} images)"
    else:
        report = None
        probs = trainer.predict_proba(x_train)
        cm_title = f"training images ({len(y_train)}; no validation split)"
    cm_report = report or classification_report(y_train, probs.argmax(1), images.classes)
    if report is None and calibration and calibration["source"].startswith("out-of-fold"):
        # the images predicted by models that did not train on them: a picture of new parts,
        # where the training images themselves would draw a perfect diagonal
        cm_report = classification_report(calibration["_y"], np.asarray(calibration["_logits"]).argmax(1),
                                          images.classes)
        cm_title = f"out of fold ({len(calibration['_y'])} training images, each by a model that did not see it)"
    score_s = time.perf_counter() - t0

    metrics = {
        "lineside_version": lineside.__version__,
        "backbone": cfg.backbone,
        "weights": cfg.weights if plan.strategy != "scratch" else "none",
        "strategy": plan.strategy,
        "strategy_reason": plan.reason,
        "auto_cross_validation": result.auto_cv,
        "plan": {"frozen_stages": plan.frozen, "total_stages": len(trainer.model.stages),
                 "views": plan.views, "epochs": plan.epochs,
                 "test_views": list(trainer.model.views) if trainer.model.views else None,
                 "best_epoch": result.best_epoch},
        "interrupted": result.interrupted,
        "device": str(trainer.device),
        "processes": dist.world,
        "threads": torch.get_num_threads(),
        "input_spec": spec.to_dict(),
        "labels": list(images.classes),
        "train_counts": train_set.counts(),
        "val_counts": val_set.counts() if val_set is not None else None,
        "split": split_note,
        "validation_images": runs.VALIDATION if val_set is not None else None,
        "data": str(Path(data).resolve()),
        "data_fingerprint": images.fingerprint(),
        "skipped_images": bad,
        "validation": report,
        "calibration": {k: v for k, v in calibration.items() if not k.startswith("_")} if calibration else None,
        "training_set": None if report else cm_report,
        # total: reading to calibration; then the final scoring and (below) writing the run folder
        "seconds": {"total": round(train_seconds, 2), "read_s": round(read_s, 2), "setup_s": round(setup_s, 2),
                    **{k: round(v, 2) for k, v in result.timings.items()}, "score_s": round(score_s, 2)},
        "host": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
                 "gpu": gpu_name(trainer.device), "layout": layout(trainer.device)},
    }
    if not dist.main:
        return metrics
    t0 = time.perf_counter()
    trained = TrainedInfo(strategy=metrics["strategy"], weights=metrics["weights"],
                          data_fingerprint=metrics["data_fingerprint"], lineside_version=metrics["lineside_version"],
                          val_balanced_accuracy=report["balanced_accuracy"] if report else None,
                          reject_below=calibration["reject_below"] if calibration else None)
    save_checkpoint(out / runs.MODEL, trainer.model, images.classes, cfg.backbone, spec, trained)
    if val_set is not None:
        val_set.write_manifest(out / runs.VALIDATION)
    _write_history(out / runs.HISTORY, result.history.rows)
    plot_confusion(np.asarray(cm_report["confusion_matrix"]), images.classes, out / runs.CONFUSION, cm_title)
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
    return metrics


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
