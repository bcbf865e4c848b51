"""The run folder: what `lineside train` writes, and what export, eval and study read of
it. No other module names these files.

    RUN/model.pt              the model and a TrainedInfo (lineside.train.checkpoint)
    RUN/config.yaml           the options it trained with (written first: a failed run says what it tried)
    RUN/metrics.json          what training measured; `data` names the training images
    RUN/history.csv           one row per epoch
    RUN/confusion_matrix.png  validation's, or the out-of-fold answers'
    RUN/calibration.png       the reliability diagram, when calibrated
    RUN/validation.csv        the held-out images (path,label): export judges INT8 on them
    RUN/out_of_fold.npz       calibrated out-of-fold logits and labels of the training images
    RUN/scores.png, scores.npz  an anomaly model's out-of-fold scores and the other folders'
    RUN/data.csv              several data sources combined into one manifest
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MODEL = "model.pt"
CONFIG = "config.yaml"
METRICS = "metrics.json"
HISTORY = "history.csv"
CONFUSION = "confusion_matrix.png"
CALIBRATION = "calibration.png"
VALIDATION = "validation.csv"
OUT_OF_FOLD = "out_of_fold.npz"
SCORES_PNG = "scores.png"
SCORES_NPZ = "scores.npz"
DATA_MANIFEST = "data.csv"


@dataclass(frozen=True)
class RunFolder:
    """A run folder, given as the folder or a file in it (its model.pt)."""
    root: Path

    @classmethod
    def at(cls, path) -> RunFolder:
        path = Path(path)
        return cls(path.parent if path.is_file() else path)

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    @property
    def model(self) -> Path:
        return self.root / MODEL

    def holds_model(self) -> bool:
        return self.model.exists()

    def metrics(self) -> dict:
        """metrics.json, or {} when the run has none (or it is unreadable)."""
        try:
            doc = json.loads((self.root / METRICS).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def data(self) -> str | None:
        """The training images the run names (metrics.json `data`), when it names them."""
        data = self.metrics().get("data")
        return data if isinstance(data, str) else None


CLASSIFY_INFO = ("strategy", "weights", "data_fingerprint", "lineside_version", "val_balanced_accuracy", "reject_below")
ANOMALY_INFO = ("strategy", "weights", "data_fingerprint", "lineside_version", "reject_below", "task", "ok_classes",
                "threshold", "false_reject_target")


@dataclass(frozen=True)
class TrainedInfo:
    """What a model.pt says of its training (its `info`), typed: read by export (the
    bundle's provenance, the reject threshold, the INT8 plan), eval and predict."""
    strategy: str | None = None
    weights: str | None = None
    data_fingerprint: str | None = None
    lineside_version: str | None = None
    val_balanced_accuracy: float | None = None
    reject_below: float | None = None
    task: str | None = None                  # "anomaly", or None for a classifier
    ok_classes: tuple[str, ...] | None = None
    threshold: float | None = None
    false_reject_target: float | None = None

    @property
    def good_classes(self) -> list[str]:
        """An anomaly model's good classes ("good" when it does not say)."""
        return list(self.ok_classes or ("good",))

    def trained_end_to_end(self) -> bool:
        """Whether the network's own layers learned from the training images (not only a head)."""
        return self.strategy in ("finetune", "full", "scratch")

    def to_dict(self) -> dict:
        """The dict model.pt stores (a plain dict: it loads with weights_only=True)."""
        keys = ANOMALY_INFO if self.task == "anomaly" else CLASSIFY_INFO
        return {k: list(v) if isinstance(v, tuple) else v for k in keys for v in [getattr(self, k)]}

    @classmethod
    def from_dict(cls, info) -> TrainedInfo:
        """From a model.pt's info; what is missing or of the wrong type reads as None."""
        info = info if isinstance(info, dict) else {}

        def text(k):
            return info[k] if isinstance(info.get(k), str) else None

        def number(k):
            v = info.get(k)
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

        ok = info.get("ok_classes")
        ok = tuple(ok) if isinstance(ok, list) and all(isinstance(c, str) for c in ok) and ok else None
        return cls(text("strategy"), text("weights"), text("data_fingerprint"), text("lineside_version"),
                   number("val_balanced_accuracy"), number("reject_below"), text("task"), ok, number("threshold"),
                   number("false_reject_target"))
