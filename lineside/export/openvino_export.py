"""ONNX model -> OpenVINO IR (FP32), carrying the same lineside metadata in rt_info, and
the `model_info` that OpenVINO Model API reads, so that its ClassificationModel (and
OpenVINO Model Server with it) loads a lineside IR as it is."""

from __future__ import annotations

from pathlib import Path

from lineside.errors import require

from lineside.metadata import METADATA_KEY, ModelMetadata


def export_openvino(onnx_path: Path, xml_path: Path, metadata: ModelMetadata) -> Path:
    ov = require("openvino", "export")
    model = ov.convert_model(str(onnx_path))
    set_metadata(model, metadata)
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    return xml_path


def model_api_info(metadata: ModelMetadata) -> dict[str, str]:
    """rt_info `model_info` for OpenVINO Model API's ClassificationModel. The graph takes
    uint8 RGB (N, H, W, 3) and does its own normalisation (empty mean and scale); Model API
    hands it BGR frames from OpenCV, hence reverse_input_channels; its outputs are already
    probabilities, which Model API recognises and does not softmax again. Labels are
    space-separated there, so spaces inside a label become underscores."""
    return {
        "model_type": "Classification",
        "labels": " ".join(str(label).replace(" ", "_") for label in metadata.labels),
        "layout": "image:NHWC",
        "reverse_input_channels": "True",
        "mean_values": "",
        "scale_values": "",
        "resize_type": "standard",
        "output_raw_scores": "True",
        "confidence_threshold": str(metadata.reject_below or 0.0),
    }


def set_metadata(model, metadata: ModelMetadata) -> None:
    """lineside's own metadata (one JSON string) and Model API's model_info, on an IR."""
    model.set_rt_info(metadata.to_json(), [METADATA_KEY])
    for key, value in model_api_info(metadata).items():
        model.set_rt_info(value, ["model_info", key])



def export_model_api_anomaly(xml_path: Path, out_xml: Path, metadata: ModelMetadata) -> Path:
    """An anomaly model's IR as OpenVINO Model API's AnomalyDetection loads it as it is: the
    same graph with the anomaly map (the map over the threshold) as its one output, and the
    `model_info` that wrapper reads. Its image and pixel thresholds are 1 (the map is
    relative to lineside's threshold), so Model API's label agrees with lineside's verdict;
    its normalisation scale is lineside's score scale over the threshold."""
    ov = require("openvino", "export")
    a = metadata.anomaly
    model = ov.Core().read_model(str(xml_path))
    results = [r for r in model.get_results() if a["map_output"] in r.input_value(0).get_names()]
    if len(results) != 1:
        raise ValueError(f"{xml_path}: no single output named {a['map_output']}")
    single = ov.Model(results, model.get_parameters(), "lineside_anomaly")
    info = {
        "model_type": "AnomalyDetection",
        "labels": " ".join([str(metadata.labels[0]).replace(" ", "_"), str(metadata.labels[-1]).replace(" ", "_")]),
        "layout": "image:NHWC",
        "reverse_input_channels": "True",
        "mean_values": "",
        "scale_values": "",
        "resize_type": "standard",
        "image_threshold": "1.0",
        "pixel_threshold": "1.0",
        "normalization_scale": repr(float(a["scale"]) / float(a["threshold"])),
        "task": "segmentation",
    }
    for key, value in info.items():
        single.set_rt_info(value, ["model_info", key])
    ov.save_model(single, str(out_xml), compress_to_fp16=False)
    return out_xml
