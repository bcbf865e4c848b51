"""`lineside train --task anomaly`: good images in, an anomaly run folder out.

    RUN/model.pt        the frozen backbone stages, what good patches look like (a bank of
                        them, a Gaussian per position, or both), the threshold
    RUN/metrics.json    threshold, the false-reject rate it promises (with its uncertainty),
                        and with defect images at hand their detection rate and the AUROC
    RUN/scores.png      out-of-fold scores of the good images, scores of the defect images,
                        the threshold

Only the good images (the class `good`, or those named by --ok-classes) are trained
on; the other classes, when present, are scored to report what the threshold catches.
"""

from __future__ import annotations

import json
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import lineside
from lineside import runs
from lineside.dataset import ImageSet, image_sizes, load_arrays, load_image_set
from lineside.errors import LinesideError
from lineside.runs import TrainedInfo

from . import anomaly as A
from .backbones import BACKBONES
from .checkpoint import save_checkpoint
from .device import pick_device

# the folder names read as the good class without --ok-classes, in this order of preference,
# compared without case or punctuation ("Good", "OK", "no_defect", "Non-Defective")
DEFAULT_OK = ("good", "ok", "okay", "pass", "functional", "normal", "nodefect", "nodefects", "nondefective",
              "defectfree", "intact")


def plain_name(name: str) -> str:
    """A class name as DEFAULT_OK spells it: lower case, letters and digits only."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def default_ok(classes) -> str | None:
    """The class DEFAULT_OK names (the first of its names found), None when there is none."""
    plain = {plain_name(c): c for c in reversed(list(classes))}
    return next((plain[name] for name in DEFAULT_OK if name in plain), None)


def ok_classes_of(classes, ok_classes) -> tuple[str, ...]:
    """The good classes: those named, else the one folder called good (or ok, normal, ...:
    DEFAULT_OK)."""
    if ok_classes:
        names = tuple(c.strip() for c in str(ok_classes).split(",") if c.strip()) \
            if isinstance(ok_classes, str) else tuple(ok_classes)
        unknown = [c for c in names if c not in classes]
        if unknown or not names:
            raise LinesideError(f"--ok-classes: {', '.join(unknown) or 'empty'} not among the data's classes "
                                f"({', '.join(classes)})")
        return names
    found = default_ok(classes)
    if len(classes) == 1:
        return tuple(classes)
    if found is None:
        raise LinesideError(f"--task anomaly: no class named good among {', '.join(classes)}; "
                            "name the good ones with --ok-classes")
    return (found,)


@dataclass
class AnomalyData:
    """An anomaly task's images, read at the input size its good images call for: the
    good ones (trained on) and the other folders (only scored)."""
    images: ImageSet
    ok: tuple[str, ...]
    spec: object
    x_good: np.ndarray
    x_other: np.ndarray
    other_set: ImageSet
    bad: list


def read_anomaly_data(data, ok_classes=None, image_size: int | None = None, backbone: str = "efficientnet_lite0",
                      skip_bad: bool = False, progress: bool = True) -> AnomalyData:
    images = load_image_set(data, min_classes=1)
    ok = ok_classes_of(images.classes, ok_classes)
    is_good = np.isin(np.asarray(images.targets), [images.classes.index(c) for c in ok])
    good_set, other_set = images.subset(np.flatnonzero(is_good)), images.subset(np.flatnonzero(~is_good))
    spec = A.spec_for(image_sizes(good_set.paths), BACKBONES.get(backbone).input_spec,
                      image_size or A.DEFAULT_SHORT_SIDE)
    x_good, good_set, bad = load_arrays(good_set, spec, skip_bad, progress, "reading good images")
    x_other = np.zeros((0, spec.height, spec.width, 3), np.uint8)
    if len(other_set):
        x_other, other_set, bad_other = load_arrays(other_set, spec, skip_bad, progress, "reading other images")
        bad += bad_other
    return AnomalyData(images, ok, spec, x_good, x_other, other_set, bad)


def scorer_words(info: dict) -> str:
    bank = f"a bank of {info['bank']} good patches"
    gauss = (f"the good patches at each place (a Gaussian per position, from "
             f"{info['gaussian_neighbourhood']}x{info['gaussian_neighbourhood']} positions)")
    return {"bank": f"against {bank}", "gaussian": f"against {gauss}",
            "both": f"against {bank} and {gauss}"}[info.get("scorer", "bank")]


def train_anomaly_run(data, out, ok_classes=None, false_reject: float = A.DEFAULT_FALSE_REJECT,
                      image_size: int | None = None, bank: int | None = None, taps=A.DEFAULT_TAPS,
                      scorer: str = A.DEFAULT_SCORER, backbone: str = "efficientnet_lite0", weights: str = "imagenet",
                      seed: int = 0, device: str = "auto", skip_bad: bool = False, progress: bool = True) -> dict:
    t_start = time.perf_counter()
    out = Path(out)
    where = pick_device(device)
    d = read_anomaly_data(data, ok_classes, image_size, backbone, skip_bad, progress)
    out.mkdir(parents=True, exist_ok=True)       # after the data: a folder that cannot be read leaves no --out
    images, ok, spec, x_good, other_set, bad = d.images, d.ok, d.spec, d.x_good, d.other_set, d.bad
    read_s = time.perf_counter() - t_start
    from tqdm import tqdm

    with tqdm(total=len(x_good), desc="patch features", unit="img", disable=not progress, leave=False) as bar:
        fit = A.fit_anomaly(x_good, spec, backbone, weights, taps, bank, false_reject, seed, where, bar.update,
                            scorer=scorer)
    info = fit.info
    oof = np.asarray(info["out_of_fold_scores"])
    report = None
    other_scores = np.zeros(0)
    if len(other_set):
        other_scores = A.anomaly_scores(fit.model, d.x_other, where).astype(np.float64)
        report = defect_report(oof, other_scores, np.asarray(other_set.targets), other_set.classes, info["threshold"])
    seconds = time.perf_counter() - t_start
    metrics = {
        "lineside_version": lineside.__version__, "task": "anomaly", "backbone": backbone, "weights": weights,
        "strategy": "anomaly", "strategy_reason": (
            f"anomaly detection from {len(x_good)} good images ({', '.join(ok)}): patch features of stages "
            f"{', '.join(map(str, info['taps']))} {scorer_words(info)}"
            + (f" ({info['scorer_note']})" if info.get("scorer_note") else "")),
        "ok_classes": list(ok), "labels": list(A.ANOMALY_LABELS), "input_spec": spec.to_dict(),
        "train_counts": {"good": len(x_good)}, "other_counts": {k: v for k, v in other_set.counts().items() if v},
        "anomaly": {k: v for k, v in info.items() if k not in ("out_of_fold_scores", "seconds")},
        "defects": report, "device": str(where), "threads": torch.get_num_threads(),
        "data": str(Path(data).resolve()), "data_fingerprint": images.fingerprint(), "skipped_images": bad,
        "seconds": {"total": round(seconds, 2), "read_s": round(read_s, 2), **info["seconds"]},
        "host": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine()},
    }
    trained = TrainedInfo(strategy="anomaly", weights=weights, data_fingerprint=metrics["data_fingerprint"],
                          lineside_version=lineside.__version__, task="anomaly", ok_classes=tuple(ok),
                          threshold=info["threshold"], false_reject_target=false_reject)
    save_checkpoint(out / runs.MODEL, fit.model, A.ANOMALY_LABELS, backbone, spec, trained)
    np.savez(out / runs.SCORES_NPZ, good_out_of_fold=oof.astype(np.float32), other=other_scores.astype(np.float32),
             threshold=np.float32(info["threshold"]))
    plot_scores(oof, other_scores, info["threshold"], out / runs.SCORES_PNG)
    (out / runs.METRICS).write_text(json.dumps(metrics, indent=2))
    return metrics


def defect_report(good_scores, other_scores, targets, classes, threshold: float) -> dict:
    """Detection at the threshold, per class and in all, and the AUROC of good (out of
    fold) against the other images."""
    per_class = {}
    for t in sorted(set(int(v) for v in targets)):
        s = other_scores[targets == t]
        per_class[classes[t]] = {"images": int(len(s)), "detected": int((s > threshold).sum())}
    y = np.r_[np.zeros(len(good_scores)), np.ones(len(other_scores))]
    auc = A.auroc(y, np.r_[good_scores, other_scores])
    return {"images": int(len(other_scores)), "detected": int((other_scores > threshold).sum()),
            "detection_rate": float((other_scores > threshold).mean()),
            "auroc": None if auc is None else 100 * auc, "per_class": per_class,
            "auroc_note": "good images scored out of fold (by banks built without them)"}


def plot_scores(good, other, threshold: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    allv = np.r_[good, other]
    bins = np.linspace(float(allv.min()), float(max(allv.max(), threshold)) * 1.02, 40)
    ax.hist(good, bins=bins, alpha=0.7, label=f"good, out of fold ({len(good)})", color="tab:green")
    if len(other):
        ax.hist(other, bins=bins, alpha=0.6, label=f"other classes ({len(other)})", color="tab:red")
    ax.axvline(threshold, color="k", ls="--", label=f"threshold {threshold:.3g}")
    ax.set_xlabel("anomaly score")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
