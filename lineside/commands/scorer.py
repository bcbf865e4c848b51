"""A run folder or an exported model, opened as the predictor lineside.scoring reports
on. It sees both training (PyTorch) and the runtime, so it lives on the CLI's floor."""

from __future__ import annotations

from pathlib import Path

from lineside.bundles import is_bundle


def is_exported(path: Path) -> bool:
    return is_bundle(path) or path.suffix in (".onnx", ".xml")


def open_scorer(model: Path, backend, precision, device, threads):
    """(predict_proba, labels, spec, description) for a run folder or an exported model.
    Exported models never import torch."""
    if is_exported(model):
        from lineside.runtime.model import open_model

        m = open_model(model, backend=backend, precision=precision, device=device or "CPU", threads=threads)
        about = {"model": str(m.path), "backend": m.backend, "reject_below": m.metadata.reject_below}
        if m.metadata.anomaly is not None:
            about["anomaly"] = {"threshold": m.metadata.anomaly["threshold"],
                                "ok_classes": m.metadata.anomaly["ok_classes"], "score": m.anomaly}
        # the model itself as the predictor: its whole() scores all the images at once
        return m, m.labels, m.spec, about
    from lineside.train.checkpoint import load_checkpoint, resolve_checkpoint
    from lineside.train.evaluate import RunScorer, run_device

    where = run_device(device)
    loaded = load_checkpoint(model)
    scorer = RunScorer(loaded.model, where)
    about = {"model": str(resolve_checkpoint(model)), "backend": "pytorch", "device": where.type,
             "reject_below": loaded.trained.reject_below}
    if getattr(loaded.model, "task", None) == "anomaly":
        from lineside.train.anomaly import anomaly_scores

        about["anomaly"] = {"threshold": float(loaded.model.threshold),
                            "ok_classes": loaded.trained.good_classes,
                            "score": lambda x: anomaly_scores(scorer.model, x, maps=True)}
    return scorer, loaded.labels, loaded.spec, about
