"""ONNX model -> OpenVINO IR (FP32), carrying the same lineside metadata in rt_info."""

from __future__ import annotations

import json
from pathlib import Path

from lineside.errors import require

from .onnx_export import METADATA_KEY


def export_openvino(onnx_path: Path, xml_path: Path, metadata: dict) -> Path:
    ov = require("openvino", "export")
    model = ov.convert_model(str(onnx_path))
    model.set_rt_info(json.dumps(metadata, sort_keys=True), [METADATA_KEY])
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    return xml_path

