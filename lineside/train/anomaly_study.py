"""`lineside study sample-size DATA --task anomaly`: how many good parts does an anomaly
model need? For each number of good images k (and --repeats draws of them), a model is
fitted on k good images drawn at random and scored on every image not drawn: the good
ones give the false-reject rate at its threshold (against the rate it promised), the
other folders the AUROC and the detection rate. Every finished fit is kept in
OUT/fits.jsonl as it ends, so that Ctrl-C loses none of them.

    OUT/sample_size.json   every fit, the means per size, the estimate for --target AUROC
    OUT/learning_curve.png AUROC and false-reject rate against the number of good images
    OUT/report.md          the same as a table, to forward
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from lineside.errors import LinesideError
from lineside.learning_curve import estimate_size
from lineside.metrics import auroc

from . import anomaly as A
from .anomaly_run import read_anomaly_data
from .device import pick_device
from .study import FITS, _pyplot, run_fits

log = logging.getLogger(__name__)

ANOMALY_SHOTS = (4, 8, 16, 32, 64)


def _sizes(shots, n_good: int, default: bool) -> list[int]:
    """The numbers of good images to try: each must leave 2 good images to score; with the
    default sizes, those that do not are left out (while 2 sizes remain)."""
    shots = sorted({int(s) for s in shots})
    if not shots or shots[0] < 2:
        raise LinesideError("--shots: an anomaly model needs at least 2 good images per fit (4 or more advised)")
    fits = [s for s in shots if s <= n_good - 2]
    if len(fits) < len(shots) and not (default and len(fits) >= 2):
        raise LinesideError(f"--shots: {', '.join(str(s) for s in shots if s not in fits)} leave(s) fewer than 2 "
                            f"of the {n_good} good images to score; use sizes up to {n_good - 2}")
    if len(fits) < len(shots):
        log.warning("--shots: %s left out: %d good images", ", ".join(str(s) for s in shots if s not in fits),
                    n_good)
    return fits


def _one_fit(x_good, x_other, spec, k: int, r: int, false_reject: float, bank: int, device) -> dict:
    """A model on k good images drawn with seed r, scored on the rest."""
    drawn = np.random.default_rng([r, k]).permutation(len(x_good))
    train, rest = drawn[:k], drawn[k:]
    t0 = time.perf_counter()
    fit = A.fit_anomaly(x_good[train], spec, bank_size=bank, false_reject=false_reject, seed=r, device=device)
    train_s = time.perf_counter() - t0
    thr = float(fit.info["threshold"])
    good_scores = A.anomaly_scores(fit.model, x_good[rest], device)
    other_scores = A.anomaly_scores(fit.model, x_other, device) if len(x_other) else np.zeros(0)
    auc = auroc(np.r_[np.zeros(len(good_scores)), np.ones(len(other_scores))], np.r_[good_scores, other_scores])
    return {"shots": k, "repeat": r, "threshold": thr, "train_s": round(train_s, 2),
            "false_reject": float(np.mean(good_scores > thr)), "good_scored": int(len(rest)),
            "detection": float(np.mean(other_scores > thr)) if len(other_scores) else None,
            "auroc": None if auc is None else round(100.0 * auc, 3)}


def anomaly_sample_size(data, out, shots=ANOMALY_SHOTS, repeats: int = 3, target: float = 0.99,
                        ok_classes=None, false_reject: float = A.DEFAULT_FALSE_REJECT, image_size: int | None = None,
                        bank: int | None = None, device: str = "auto", skip_bad: bool = False,
                        progress: bool = True) -> dict:
    t_start = time.perf_counter()
    out = Path(out)
    d = read_anomaly_data(data, ok_classes, image_size, skip_bad=skip_bad, progress=progress)
    out.mkdir(parents=True, exist_ok=True)       # after the data: a folder that cannot be read leaves no --out
    images, ok, spec, x_good, x_other, bad = d.images, d.ok, d.spec, d.x_good, d.x_other, d.bad
    shots = _sizes(shots, len(x_good), tuple(shots) == ANOMALY_SHOTS)
    where = pick_device(device)
    key = json.dumps({"data": images.fingerprint(), "ok": list(ok), "fr": false_reject, "size": spec.to_dict(),
                      "bank": bank, "scorer": A.DEFAULT_SCORER}, sort_keys=True)
    rows = run_fits(out / FITS, key, shots, repeats,
                    lambda k, r: _one_fit(x_good, x_other, spec, k, r, false_reject, bank, where), progress,
                    "sample-size study (anomaly)",
                    lambda row: f"{row['shots']} good: AUROC {row['auroc']}, false reject {row['false_reject']:.1%}")
    sizes = []
    for k in shots:
        mine = [row for row in rows if row["shots"] == k]
        fr = [row["false_reject"] for row in mine]
        aucs = [row["auroc"] for row in mine if row["auroc"] is not None]
        sizes.append({"shots": k, "false_reject_mean": float(np.mean(fr)), "false_reject_max": float(np.max(fr)),
                      "auroc_mean": float(np.mean(aucs)) if aucs else None,
                      "auroc_std": float(np.std(aucs)) if aucs else None,
                      "detection_mean": float(np.mean([row["detection"] for row in mine]))
                      if mine[0]["detection"] is not None else None})
    estimate = None
    if len(x_other):
        estimate = estimate_size(shots, {k: [row["auroc"] / 100.0 for row in rows if row["shots"] == k]
                                         for k in shots}, target)
        estimate["statement"] = estimate["statement"].replace("images per class", "good images")
    result = {"study": "sample-size", "task": "anomaly", "data": str(data), "ok_classes": list(ok),
              "good_images": int(len(x_good)), "other_images": int(len(x_other)), "repeats": repeats,
              "target_auroc": target, "false_reject_promised": false_reject, "sizes": sizes, "estimate": estimate,
              "runs": rows, "seconds": round(time.perf_counter() - t_start, 1), "skipped_images": bad}
    (out / "sample_size.json").write_text(json.dumps(result, indent=2))
    _plot(result, out / "learning_curve.png")
    (out / "report.md").write_text(_report(result))
    return result


def _plot(result: dict, path: Path) -> None:
    plt = _pyplot()
    sizes = [s["shots"] for s in result["sizes"]]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    if result["other_images"]:
        for row in result["runs"]:
            ax.scatter(row["shots"], row["auroc"], s=10, color="0.6", zorder=2)
        ax.errorbar(sizes, [s["auroc_mean"] for s in result["sizes"]], yerr=[s["auroc_std"] for s in result["sizes"]],
                    fmt="o-", color="C0", capsize=3, label="mean ± std over draws", zorder=3)
        ax.axhline(100 * result["target_auroc"], color="C3", ls="--", lw=1, label="target")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no defect images: no AUROC", ha="center", transform=ax.transAxes)
    ax.set_xscale("log")
    ax.set_xlabel("good images")
    ax.set_ylabel("AUROC on the images not drawn")
    for row in result["runs"]:
        ax2.scatter(row["shots"], 100 * row["false_reject"], s=10, color="0.6", zorder=2)
    ax2.plot(sizes, [100 * s["false_reject_mean"] for s in result["sizes"]], "o-", color="C1", label="mean")
    ax2.axhline(100 * result["false_reject_promised"], color="C3", ls="--", lw=1, label="promised")
    ax2.set_xscale("log")
    for a in (ax, ax2):      # the sizes measured as plain numbers on the log axis
        a.set_xticks(sizes, [str(k) for k in sizes])
        a.minorticks_off()
    ax2.set_xlabel("good images")
    ax2.set_ylabel("good parts flagged (%), of those not drawn")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _report(r: dict) -> str:
    lines = [f"# How many good parts? ({Path(r['data']).name}, anomaly)", "",
             f"{r['good_images']} good images ({', '.join(r['ok_classes'])}) and {r['other_images']} others; "
             f"{r['repeats']} random draws per size, each scored on every image not drawn. The threshold promises "
             f"{r['false_reject_promised']:.1%} of good parts flagged.", "",
             "| good images | AUROC (mean ± std) | good parts flagged (mean, worst draw) | defects caught |",
             "|---|---|---|---|"]
    for s in r["sizes"]:
        auc = "-" if s["auroc_mean"] is None else f"{s['auroc_mean']:.1f} ± {s['auroc_std']:.1f}"
        det = "-" if s["detection_mean"] is None else f"{s['detection_mean']:.1%}"
        lines.append(f"| {s['shots']} | {auc} | {s['false_reject_mean']:.1%}, {s['false_reject_max']:.1%} | {det} |")
    if r["estimate"]:
        lines += ["", f"For AUROC {100 * r['target_auroc']:.1f}: {r['estimate']['statement']}"]
    lines += ["", "![learning curve](learning_curve.png)", "",
              f"Made by `lineside study sample-size --task anomaly` in {r['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"
