"""Training run -> ONNX FP32 model that takes uint8 images and returns probabilities.

The exported graph holds the whole preprocessing except resizing: it takes
(N, H, W, 3) uint8 RGB, converts to float, normalises (inside the network) and
ends with softmax. The runtime only resizes a frame to the spec's size.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from lineside.errors import require
from lineside.metadata import METADATA_KEY, ModelMetadata

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
SCORE_NAME = "anomaly_score"
MAP_NAME = "anomaly_map"
OPSET = 17


class UInt8Softmax(nn.Module):
    """(N, H, W, 3) uint8 RGB -> (N, classes) probabilities."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float()
        return torch.softmax(self.classifier(x), dim=1)


class UInt8Anomaly(nn.Module):
    """(N, H, W, 3) uint8 RGB -> probabilities (N, 2) of [good, anomalous], the raw anomaly
    score (N,) and the anomaly map (N, h, w) divided by the threshold (1.0 = at the
    threshold): the whole scorer, bank and threshold included, inside the graph."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor):
        score, amap = self.model.score_and_map(image.permute(0, 3, 1, 2).float())
        return torch.softmax(self.model.logits_from_score(score), dim=1), score, amap


def export_onnx(classifier: nn.Module, height: int, width: int, path: Path, metadata: dict) -> Path:
    """Write an FP32 ONNX model with `metadata` as one JSON string under metadata_props['lineside'].
    The first output is always the probabilities; an anomaly model adds its score and map."""
    onnx = require("onnx", "export")
    if getattr(classifier, "task", None) == "anomaly":
        wrapper, outputs = UInt8Anomaly(classifier).eval(), [OUTPUT_NAME, SCORE_NAME, MAP_NAME]
    else:
        wrapper, outputs = UInt8Softmax(classifier).eval(), [OUTPUT_NAME]
    example = torch.zeros(1, height, width, 3, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            wrapper, (example,), str(path), dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=outputs,
            dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
        )
    onnx.checker.check_model(onnx.load(str(path)))
    return write_metadata(path, metadata)


def write_metadata(path: Path, metadata: ModelMetadata) -> Path:
    """Store `metadata` as one JSON string under metadata_props['lineside'], replacing any."""
    onnx = require("onnx", "export")
    model = onnx.load(str(path))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = metadata.to_json()
    onnx.save(model, str(path))
    return path

