"""Which unlabelled images are worth labelling next (`lineside study next`).

Uncertainty and diversity: the images the model is least sure of (the smallest margin
between its two likeliest classes, calibrated) are the candidates, CANDIDATES times as
many as asked for; among them the picks are spread over the model's feature space (each
the candidate farthest from the labelled images and from the picks so far, its distance
weighed by its uncertainty), so the queue is not twenty copies of one hard case.
Measured against labelling random images with benchmarks/unlabelled.py --next.
"""

from __future__ import annotations

import numpy as np

CANDIDATES = 5       # candidates per image asked for: the least certain, before spreading


def margins(probs: np.ndarray) -> np.ndarray:
    """The top probability minus the second (0: torn between two classes; 1: sure)."""
    top = np.sort(probs, 1)
    return top[:, -1] - top[:, -2]


def spread_picks(feats: np.ndarray, uncertainty: np.ndarray, labelled: np.ndarray, count: int) -> list[int]:
    """`count` rows of `feats`, greedily: each the row whose distance to the nearest of
    `labelled` and the rows picked so far, times (0.5 + its uncertainty), is the largest."""
    feats = feats / (np.linalg.norm(feats, axis=1, keepdims=True) + 1e-9)
    near = np.full(len(feats), np.inf)
    if len(labelled):
        lab = labelled / (np.linalg.norm(labelled, axis=1, keepdims=True) + 1e-9)
        near = np.min(2.0 - 2.0 * feats @ lab.T, axis=1).clip(0)
    else:
        near[:] = 1.0
    picks: list[int] = []
    weight = 0.5 + uncertainty
    taken = np.zeros(len(feats), bool)
    for _ in range(min(count, len(feats))):
        best = int(np.argmax(np.where(taken, -1.0, near * weight)))
        picks.append(best)
        taken[best] = True
        near = np.minimum(near, (2.0 - 2.0 * feats @ feats[best]).clip(0))
    return picks


def rank_for_labelling(model, x_unl: np.ndarray, x_lab: np.ndarray, count: int, device=None) -> dict:
    """The `count` unlabelled images (indices into x_unl, in the order to label them) with
    each one's predicted class, probability and margin."""
    import torch

    from .trainer import score, view_features

    device = device or next(model.parameters()).device
    classifier = getattr(model, "classifier", model)     # a GoodPartsClassifier's features are its classifier's
    feats_t = view_features(classifier, x_unl, device)
    if classifier is model:       # its answers are its head on these features: no second pass
        with torch.inference_mode():
            probs = torch.softmax(model.head(feats_t.to(device)).float(), 1).cpu().numpy()
    else:
        probs = score(model, x_unl, device)
    feats = feats_t.numpy()
    lab = view_features(classifier, x_lab, device).numpy() if len(x_lab) else np.zeros((0, feats.shape[1]))
    # the features on one scale (the labelled and unlabelled images' own), so no channel dominates
    both = np.concatenate([feats, lab])
    mu, sd = both.mean(0), both.std(0) + 1e-6
    feats, lab = (feats - mu) / sd, (lab - mu) / sd
    m = margins(probs)
    candidates = np.argsort(m, kind="stable")[:max(count * CANDIDATES, count)]
    chosen = candidates[spread_picks(feats[candidates], 1.0 - m[candidates], lab, count)]
    return {"indices": [int(i) for i in chosen], "predicted": [int(probs[i].argmax()) for i in chosen],
            "confidence": [float(probs[i].max()) for i in chosen], "margin": [float(m[i]) for i in chosen],
            "candidates": int(len(candidates)), "unlabelled": int(len(x_unl))}


QUEUE_LOG = "queue.sqlite"
QUEUE_FRAMES = "frames"
QUEUE_CSV = "queue.csv"


def write_queue(ranked: dict, paths, labels, out, model_sha256: str) -> dict:
    """The picks as a review queue in `out`: a decision log (QUEUE_LOG) with each image saved
    in QUEUE_FRAMES, so that `lineside review OUT/queue.sqlite --save OUT/frames` shows them
    (the first to label first) and writes the labelled ones where `lineside train` reads
    them; and QUEUE_CSV (rank, path, predicted class, confidence, margin) for any other tool."""
    import csv
    import time
    from pathlib import Path

    import cv2

    from lineside.errors import LinesideError
    from lineside.images import BadImage, read_image
    from lineside.runtime.records import DecisionRow, Recorder, SavePolicy

    out = Path(out)
    if (out / QUEUE_LOG).exists():
        raise LinesideError(f"{out / QUEUE_LOG}: a queue is already there; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    n = len(ranked["indices"])
    recorder = Recorder(out / QUEUE_LOG, {"source": "lineside study next", "model_sha256": model_sha256,
                                          "labels": list(labels), "settings": {"station": "study next"}},
                        SavePolicy(folder=out / QUEUE_FRAMES, when=("all",), max_files=n + 1, max_mb=1e6))
    now, written = time.time(), 0
    try:
        for rank in reversed(range(n)):        # the review page lists the newest first: rank 1 last
            path = paths[ranked["indices"][rank]]
            try:
                image = cv2.cvtColor(read_image(path), cv2.COLOR_RGB2BGR)
            except BadImage:
                continue
            while recorder.saving_backlog() >= 32:      # never more frames waiting than the saver keeps
                time.sleep(0.01)
            label = labels[ranked["predicted"][rank]]
            recorder.decision(DecisionRow(
                ts=now - rank * 1e-3, frame=rank + 1, source=str(path), origin="study next", label=label,
                confidence=ranked["confidence"][rank], top=label, verdict=None, decision=None, probabilities={},
                flags=[f"rank {rank + 1}", f"margin {ranked['margin'][rank]:.2f}"], latency_ms=0.0,
                capture_to_decision_ms=0.0, model_sha256=model_sha256, capture="study_next"), image)
            written += 1
    finally:
        recorder.close({"queued": written})
    with open(out / QUEUE_CSV, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["rank", "path", "predicted", "confidence", "margin"])
        for rank, i in enumerate(ranked["indices"]):
            w.writerow([rank + 1, str(paths[i]), labels[ranked["predicted"][rank]],
                        f"{ranked['confidence'][rank]:.4f}", f"{ranked['margin'][rank]:.4f}"])
    return {"queued": written, "log": str(out / QUEUE_LOG), "frames": str(out / QUEUE_FRAMES),
            "csv": str(out / QUEUE_CSV)}
