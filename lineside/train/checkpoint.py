"""model.pt: weights plus everything needed to rebuild and feed the model.

Saved as a plain dict of tensors, strings and numbers so it loads with
torch.load(weights_only=True); nothing in it is unpickled as code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lineside.errors import LinesideError
from lineside.metadata import check_labels
from lineside.runs import MODEL, TrainedInfo
from lineside.spec import InputSpec

from .backbones import BACKBONES
from .model import Classifier

FORMAT = "lineside-checkpoint"
FORMAT_VERSION = 1


@dataclass
class LoadedModel:
    model: Classifier
    labels: list[str]
    backbone: str
    spec: InputSpec
    trained: TrainedInfo


def save_checkpoint(path: Path, model: Classifier, labels, backbone: str, spec: InputSpec,
                    trained: TrainedInfo) -> None:
    if getattr(model, "task", None) == "anomaly":
        payload = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "task": "anomaly",
            "backbone": backbone, "labels": list(labels), "input_spec": spec.to_dict(),
            "anomaly": model.shape(),
            "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "info": trained.to_dict(),
        }
        return _write(path, payload)
    guarded = model if hasattr(model, "guard") else None  # a GuardedClassifier holds the rest
    inner = model.inner if guarded is not None else model
    classifier = getattr(inner, "classifier", inner)      # a GoodPartsClassifier holds one
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backbone": backbone,
        "labels": list(labels),
        "input_spec": spec.to_dict(),
        "dropout": float(classifier.dropout.p),
        "taps": list(classifier.taps) if classifier.taps else None,
        "views": list(classifier.views) if classifier.views else None,
        "pool": classifier.pool,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "info": trained.to_dict(),
    }
    if classifier is not inner:
        from .good_parts import describe

        payload["good_parts"] = describe(inner)
    if guarded is not None:
        from . import guard

        payload["guard"] = guard.describe(guarded)
    _write(path, payload)


def _write(path: Path, payload: dict) -> None:
    tmp = Path(str(path) + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # never leave a half-written model.pt behind


def resolve_checkpoint(path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / MODEL
    if not path.is_file():
        raise LinesideError(f"{path}: no such model file (give a training run folder or its model.pt)")
    return path


def load_checkpoint(path) -> LoadedModel:
    path = resolve_checkpoint(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every unreadable file is the same user error
        raise LinesideError(f"{path}: not a readable lineside checkpoint ({exc.__class__.__name__})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise LinesideError(f"{path}: not a lineside checkpoint (missing format marker)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise LinesideError(f"{path}: checkpoint version {payload.get('format_version')} is not supported "
                            f"(this lineside reads version {FORMAT_VERSION})")
    labels = list(check_labels(payload.get("labels"), f"{path}: checkpoint"))
    spec = InputSpec.from_dict(payload.get("input_spec"))
    entry = BACKBONES.get(str(payload.get("backbone")))
    if payload.get("task") == "anomaly":
        return _load_anomaly(path, payload, labels, spec, entry)
    taps = payload.get("taps")
    if taps is not None and not (isinstance(taps, list) and taps and all(isinstance(t, int) for t in taps)):
        raise LinesideError(f"{path}: checkpoint has an invalid 'taps' entry")
    views = payload.get("views")
    if views is not None and not (isinstance(views, list) and views and all(isinstance(k, int) for k in views)):
        raise LinesideError(f"{path}: checkpoint has an invalid 'views' entry")
    classes = len(labels) - (payload.get("guard") is not None)     # the guard adds its label
    try:
        model = Classifier(entry.build(), entry.feature_dim, classes, spec,
                           dropout=float(payload.get("dropout", 0.0)), taps=taps, views=views,
                           pool=str(payload.get("pool", "avg")))
        if payload.get("good_parts") is not None:
            from .good_parts import rebuild

            model = rebuild(model, entry, spec, payload["good_parts"])
        if payload.get("guard") is not None:
            from . import guard

            model = guard.rebuild(model, entry, spec, payload["guard"], classes)
    except ValueError as exc:
        raise LinesideError(f"{path}: {exc}") from exc
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, KeyError, TypeError) as exc:
        raise LinesideError(f"{path}: weights do not match backbone {entry.name} "
                            f"with {len(labels)} classes ({str(exc).splitlines()[0]})") from exc
    model.eval()
    return LoadedModel(model, labels, entry.name, spec, TrainedInfo.from_dict(payload.get("info")))


def _load_anomaly(path: Path, payload: dict, labels, spec: InputSpec, entry) -> LoadedModel:
    from .anomaly import empty_model

    try:
        model = empty_model(entry.build().stages, spec, payload.get("anomaly"))
    except ValueError as exc:
        raise LinesideError(f"{path}: anomaly checkpoint has an invalid 'anomaly' entry") from exc
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise LinesideError(f"{path}: anomaly model does not match backbone {entry.name} "
                            f"({str(exc).splitlines()[0]})") from exc
    model.eval()
    return LoadedModel(model, labels, entry.name, spec, TrainedInfo.from_dict(payload.get("info")))
