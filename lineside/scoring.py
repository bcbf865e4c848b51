"""Evaluation and prediction around any `predict_proba(uint8 images) -> probabilities`:
a training run (PyTorch) and an exported model (ONNX Runtime / OpenVINO) report alike.
The ground floor: it sees neither; lineside.commands.scorer opens either as a predictor."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .dataset import load_arrays, load_image_set
from .errors import LinesideError
from .images import is_image_file, read_image
from .metrics import classification_report, confidence_report
from .spec import InputSpec, resize_to_spec

PredictFn = Callable[[np.ndarray], np.ndarray]
BATCH = 32


def predict_batched(predict: PredictFn, x: np.ndarray, progress: bool = False) -> np.ndarray:
    """predict over x in batches; a predict with a `whole(x, progress)` method (a training
    run: see lineside.train.evaluate) is handed all of x at once and batches itself."""
    from tqdm import tqdm

    whole = getattr(predict, "whole", None)
    if whole is not None:
        return whole(x, progress)
    out = [predict(x[s:s + BATCH]) for s in tqdm(range(0, len(x), BATCH), desc="predicting", unit="batch",
                                                 disable=not progress, leave=False)]
    return np.concatenate(out)


GALLERY_WRONG = 60   # misclassified images drawn by eval --out, the most confident first


def evaluate(predict: PredictFn, labels, spec: InputSpec, data, skip_bad=False, progress=True,
             reject_below: float | None = None, out: Path | None = None) -> dict:
    images = load_image_set(data, classes=list(labels))
    x, images, bad = load_arrays(images, spec, skip_bad, progress, "reading images")
    probs = predict_batched(predict, x, progress)
    pred = probs.argmax(1)
    report = classification_report(images.targets, pred, labels)
    report["misclassified"] = [
        {"path": str(p), "true": labels[t], "predicted": labels[int(q)], "confidence": float(c)}
        for p, t, q, c in zip(images.paths, images.targets, pred, probs.max(1)) if t != q
    ]
    report["confidence"] = confidence_report(probs, images.targets, reject_below)
    report.update(data=str(data), skipped_images=bad)
    if out is not None:
        report["out"] = write_eval_figures(Path(out), report, x, images, probs, labels)
    return report


def write_eval_figures(out: Path, report: dict, x, images, probs, labels) -> dict:
    """eval --out: confusion_matrix.png, the misclassified images (the most confident
    first) as captioned PNGs, and index.html showing both."""
    import json

    from .figures import confusion_image, gallery_page, thumbnail, write_png

    out.mkdir(parents=True, exist_ok=True)
    write_png(out / "confusion_matrix.png", confusion_image(
        np.asarray(report["confusion_matrix"]), labels,
        f"{report['n']} images of {Path(str(report['data'])).name}: balanced accuracy "
        f"{report['balanced_accuracy']:.1%}"))
    wrong = [i for i in np.argsort(-probs.max(1)) if images.targets[i] != int(probs[i].argmax())][:GALLERY_WRONG]
    items = []
    for rank, i in enumerate(wrong):
        t, q = labels[images.targets[i]], labels[int(probs[i].argmax())]
        name = f"wrong-{rank:03d}-{Path(images.paths[i]).stem[:40]}.png"
        write_png(out / name, thumbnail(x[i], f"{t} -> {q} {probs[i].max():.0%}"))
        items.append((name, f"{images.paths[i]}: true {t}, predicted {q} ({probs[i].max():.1%})"))
    gallery_page(out / "index.html", f"lineside eval: {report['data']}",
                 [("confusion matrix (rows: true class)", [("confusion_matrix.png", "")]),
                  ("misclassified, the most confident first", items)])
    (out / "report.json").write_text(json.dumps({k: v for k, v in report.items() if k != "out"}, indent=2))
    return {"folder": str(out), "files": ["confusion_matrix.png", "index.html", "report.json"]
            + [n for n, _ in items]}


def expand_images(paths) -> list[Path]:
    """Image files as given; a folder stands for the images in it (sorted, recursive)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and is_image_file(q))
            if not found:
                raise LinesideError(f"{p}: folder holds no images")
            out += found
        else:
            out.append(p)
    return out


def predict_paths(predict: PredictFn, labels, spec: InputSpec, paths) -> list[dict]:
    """Label and every class probability for each image (a bad file raises, naming it)."""
    paths = expand_images(paths)
    x = np.stack([resize_to_spec(read_image(p), spec) for p in paths])
    probs = predict_batched(predict, x)
    return [
        {"path": str(p), "label": labels[int(row.argmax())], "confidence": float(row.max()),
         "probabilities": {name: float(v) for name, v in zip(labels, row)}}
        for p, row in zip(paths, probs)
    ]


# --- anomaly models -----------------------------------------------------------------
GALLERY = 12   # worst good parts and missed defects drawn by eval --gallery


def anomaly_in_batches(score, x: np.ndarray, progress: bool = False, batch: int = BATCH):
    """score(images) -> (scores, maps) over x in batches, with a progress bar."""
    from tqdm import tqdm

    scores, maps = [], []
    with tqdm(total=len(x), desc="scoring", unit="img", disable=not progress, leave=False) as bar:
        for s in range(0, len(x), batch):
            sc, m = score(x[s:s + batch])
            scores.append(np.asarray(sc, np.float64).reshape(-1))
            maps.append(np.asarray(m, np.float32))
            bar.update(len(scores[-1]))
    if not scores:
        return np.zeros(0), np.zeros((0, 1, 1), np.float32)
    return np.concatenate(scores), np.concatenate(maps)


def evaluate_anomaly(anomaly: dict, spec: InputSpec, data, skip_bad=False, progress=True,
                     out: Path | None = None) -> dict:
    """An anomaly model on DATA: the good classes against every other folder (whatever the
    defect is called). Reports the AUROC, the false-reject rate on the good images and
    the detection rate on the others at the model's threshold, per folder, the worst
    good parts and the missed defects; with `out`, their overlays as PNGs there, with
    index.html and report.json."""
    from .metrics import auroc

    raw = load_image_set(data, min_classes=1)
    x, kept, bad = load_arrays(raw, spec, skip_bad, progress, "reading images")
    scores, maps = anomaly_in_batches(anomaly["score"], x, progress)
    thr = float(anomaly["threshold"])
    ok = set(anomaly["ok_classes"])
    is_good = np.array([kept.classes[t] in ok for t in kept.targets], bool)
    flagged = scores > thr
    per_class = {}
    for c, name in enumerate(kept.classes):
        sel = np.asarray(kept.targets) == c
        if sel.any():
            per_class[name] = {"images": int(sel.sum()), "flagged": int(flagged[sel].sum()),
                               "good": name in ok, "score_median": float(np.median(scores[sel]))}
    auc = auroc(~is_good, scores)

    def rows(sel, order):
        return [{"path": str(kept.paths[i]), "class": kept.classes[kept.targets[i]], "score": float(scores[i]),
                 "relative": float(scores[i] / thr)} for i in order if sel[i]][:GALLERY]

    worst_good = rows(is_good, np.argsort(-scores))
    missed = rows(~is_good & ~flagged, np.argsort(scores))
    report = {
        "task": "anomaly", "n": int(len(scores)), "threshold": thr, "ok_classes": sorted(ok),
        "auroc": None if auc is None else 100.0 * auc,
        "false_reject": float(flagged[is_good].mean()) if is_good.any() else None,
        "detection": float(flagged[~is_good].mean()) if (~is_good).any() else None,
        "good_images": int(is_good.sum()), "other_images": int((~is_good).sum()),
        "per_class": per_class, "worst_good": worst_good, "missed": missed,
        "data": str(data), "skipped_images": bad,
    }
    if out is not None:
        report["out"] = write_anomaly_figures(Path(out), report, x, maps, kept.paths)
    return report


def write_anomaly_figures(out: Path, report: dict, x, maps, paths) -> dict:
    """eval --out for an anomaly model: the heatmaps of the worst good parts and the missed
    defects as PNGs, with index.html and report.json."""
    import json

    from .figures import gallery_page
    from .heatmap import write_overlay

    out.mkdir(parents=True, exist_ok=True)
    index = {str(p): i for i, p in enumerate(paths)}
    written, sections = [], []
    for kind, heading, items in (("worst-good", "good parts scored highest", report["worst_good"]),
                                 ("missed", "defects below the threshold", report["missed"])):
        shown = []
        for rank, r in enumerate(items):
            i = index[r["path"]]
            name = f"{kind}-{rank:02d}-{Path(r['path']).stem[:40]}.png"
            write_overlay(out / name, x[i], maps[i], f"{r['class']} {r['relative']:.2f}x threshold")
            written.append(name)
            shown.append((name, f"{r['path']}: {r['relative']:.2f}x the threshold"))
        sections.append((heading, shown))
    gallery_page(out / "index.html", f"lineside eval (anomaly): {report['data']}", sections)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return {"folder": str(out), "files": ["index.html", "report.json"] + written}


def predict_anomaly(anomaly: dict, spec: InputSpec, paths, overlays: Path | None = None) -> list[dict]:
    """Score, verdict and (with `overlays`) a heatmap PNG for each image."""
    paths = expand_images(paths)
    x = np.stack([resize_to_spec(read_image(p), spec) for p in paths])
    scores, maps = anomaly_in_batches(anomaly["score"], x)
    thr = float(anomaly["threshold"])
    out = []
    for i, p in enumerate(paths):
        verdict = "anomalous" if scores[i] > thr else "good"
        r = {"path": str(p), "label": verdict, "score": float(scores[i]), "threshold": thr,
             "relative": float(scores[i] / thr)}
        if overlays is not None:
            from .heatmap import write_overlay

            Path(overlays).mkdir(parents=True, exist_ok=True)
            r["overlay"] = str(write_overlay(Path(overlays) / f"{i:04d}-{p.stem}.png", x[i], maps[i],
                                             f"{verdict} {r['relative']:.2f}x threshold"))
        out.append(r)
    return out
