"""What an exported model says about itself: one frozen ModelMetadata, validated when it
is written and when it is read, shared by export, the runtime and checkpoints.

It travels as one JSON document inside each model file (ONNX `metadata_props`, OpenVINO
`rt_info`, key `lineside`) and in bundle.json. Schema lineside.model/2 describes the
input once (`input`: tensor name, layout, dtype and the preprocessing spec);
lineside.model/1 documents (an `input` block and an `input_spec` beside it) are still
read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

from .errors import LinesideError
from .spec import InputSpec

METADATA_KEY = "lineside"
MODEL_SCHEMA = "lineside.model/2"
READABLE_SCHEMAS = ("lineside.model/1", MODEL_SCHEMA)
BUNDLE_SCHEMA = 1


def check_labels(labels, where: str) -> tuple[str, ...]:
    """At least two distinct, non-empty class names."""
    if (not isinstance(labels, (list, tuple)) or len(labels) < 2
            or not all(isinstance(x, str) and x for x in labels) or len(set(labels)) != len(labels)):
        raise LinesideError(f"{where}: no valid label list (two or more distinct names)")
    return tuple(labels)


def check_anomaly(a) -> dict:
    """An anomaly block: a positive finite threshold, the good classes, the output names,
    and the scale of the probabilities' log-odds (P(anomalous) = sigmoid((score -
    threshold) / scale)), from which a decision recovers the score."""
    import math

    ok = (isinstance(a, dict) and isinstance(a.get("threshold"), (int, float))
          and math.isfinite(a["threshold"]) and a["threshold"] > 0
          and isinstance(a.get("ok_classes"), list) and a["ok_classes"]
          and all(isinstance(c, str) and c for c in a["ok_classes"])
          and all(isinstance(a.get(k), str) and a[k] for k in ("score_output", "map_output")))
    if not ok:
        raise LinesideError("model metadata: invalid anomaly block (threshold > 0, ok_classes, score_output, "
                            "map_output)")
    scale = a.get("scale")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise LinesideError("model metadata: the anomaly block's scale must be a positive number")
    return {"threshold": float(a["threshold"]), "ok_classes": list(a["ok_classes"]),
            **({"scale": float(scale)} if scale is not None else {}),
            "score_output": a["score_output"], "map_output": a["map_output"],
            **({"map_size": [int(v) for v in a["map_size"]]} if isinstance(a.get("map_size"), list) else {})}


@dataclass(frozen=True)
class ModelMetadata:
    labels: tuple[str, ...]
    spec: InputSpec
    test_views: tuple[int, ...] | None = None
    reject_below: float | None = None
    provenance: dict = field(default_factory=dict, compare=False)
    input_name: str = "image"
    output_name: str = "probabilities"
    # an anomaly model's threshold and good classes: {"threshold": raw score, "ok_classes":
    # [...], "score_output": ..., "map_output": ..., "map_size": [h, w]}; None for a classifier
    anomaly: dict | None = field(default=None, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "labels", check_labels(self.labels, "model metadata"))
        if not isinstance(self.spec, InputSpec):
            raise LinesideError("model metadata: the input spec is missing")
        if self.test_views is not None:
            views = self.test_views
            if not (isinstance(views, (list, tuple)) and views and all(isinstance(k, int) and 0 <= k < 8
                                                                       for k in views)):
                raise LinesideError(f"model metadata: test views {views!r} are not orientations 0..7")
            object.__setattr__(self, "test_views", tuple(views))
        if self.reject_below is not None and not (isinstance(self.reject_below, (int, float))
                                                  and 0.0 <= self.reject_below <= 1.0):
            raise LinesideError(f"model metadata: reject_below {self.reject_below!r} is outside 0..1")
        if not isinstance(self.provenance, dict):
            raise LinesideError("model metadata: provenance must be a mapping")
        if self.anomaly is not None:
            object.__setattr__(self, "anomaly", check_anomaly(self.anomaly))

    @property
    def task(self) -> str:
        return "classify" if self.anomaly is None else "anomaly"

    @property
    def precision(self) -> str | None:
        return self.provenance.get("precision")

    def with_precision(self, precision: str) -> "ModelMetadata":
        return replace(self, provenance={**self.provenance, "precision": precision})

    def to_dict(self) -> dict:
        return {
            "schema": MODEL_SCHEMA,
            "labels": list(self.labels),
            "input": {"name": self.input_name, "layout": "NHWC", "dtype": "uint8", "spec": self.spec.to_dict()},
            "output": {"name": self.output_name, "kind": "softmax"},
            "thresholds": {"reject_below": self.reject_below},
            "test_views": list(self.test_views) if self.test_views else None,
            "provenance": dict(self.provenance),
            **({"task": "anomaly", "anomaly": dict(self.anomaly)} if self.anomaly else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d, where: str = "model") -> "ModelMetadata":
        if not isinstance(d, dict) or d.get("schema") not in READABLE_SCHEMAS:
            found = d.get("schema") if isinstance(d, dict) else None
            raise LinesideError(f"{where}: metadata schema {found!r} is not supported (this lineside reads "
                                f"{', '.join(READABLE_SCHEMAS)})")
        block = d.get("input") if isinstance(d.get("input"), dict) else {}
        spec = block.get("spec") if d["schema"] == MODEL_SCHEMA else d.get("input_spec")
        thresholds = d.get("thresholds") if isinstance(d.get("thresholds"), dict) else {}
        output = d.get("output") if isinstance(d.get("output"), dict) else {}
        try:
            return cls(labels=check_labels(d.get("labels"), "metadata"), spec=InputSpec.from_dict(spec),
                       test_views=d.get("test_views"), reject_below=thresholds.get("reject_below"),
                       provenance=d.get("provenance") or {}, input_name=str(block.get("name", "image")),
                       output_name=str(output.get("name", "probabilities")), anomaly=d.get("anomaly"))
        except LinesideError as exc:
            raise LinesideError(f"{where}: {exc}") from None

    @classmethod
    def from_json(cls, text: str | None, where: str = "model") -> "ModelMetadata":
        if not text:
            raise LinesideError(f"{where}: model has no lineside metadata (was it exported by lineside export?)")
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LinesideError(f"{where}: lineside metadata is not valid JSON") from exc
        return cls.from_dict(d, where)
