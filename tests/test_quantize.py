"""INT8: quantized OpenVINO models are kept only when they keep FP32's accuracy."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from lineside.cli import main
from lineside.export import bundle as bundle_mod
from lineside.export.bundle import export_bundle
from lineside.export.quantize import ORT_RECIPES, RECIPES, int8_gate


def test_gate_by_hand():
    labels = ["ok", "dent", "scratch"]
    y = np.array([0, 0, 1, 1, 2, 2])
    p32 = np.eye(3)[y] * 0.9 + 0.03
    broken = np.eye(3)[[0, 0, 0, 0, 2, 2]] * 0.9 + 0.03  # never says "dent"
    g = int8_gate(y, p32, broken, labels, max_drop=0.5)
    assert g["fp32_balanced_accuracy"] == 1.0
    assert g["int8_balanced_accuracy"] == pytest.approx(2 / 3)
    assert g["drop_points"] == pytest.approx(100 / 3)
    assert g["passed"] is False
    assert g["recall_change"]["dent"] == -1.0 and g["recall_change"]["ok"] == 0.0
    assert [f["image"] for f in g["flipped"]] == [2, 3]
    assert int8_gate(y, p32, p32, labels, max_drop=0.0)["passed"] is True


def test_gate_also_demands_agreement_with_fp32():
    """Two images swap labels: balanced accuracy is unchanged, agreement is 4/6."""
    labels = ["ok", "dent", "scratch"]
    y = np.array([0, 0, 1, 1, 2, 2])
    p32 = np.eye(3)[[0, 1, 1, 1, 2, 2]]                  # one ok image called dent
    swapped = np.eye(3)[[1, 0, 1, 1, 2, 2]]              # int8: the other ok image instead
    g = int8_gate(y, p32, swapped, labels, max_drop=0.0, min_agreement=99.0)
    assert g["drop_points"] == pytest.approx(0.0) and g["top1_agreement"] == pytest.approx(4 / 6)
    assert g["passed"] is False
    assert int8_gate(y, p32, swapped, labels, max_drop=0.0, min_agreement=60.0)["passed"] is True


def test_float_ends_are_the_first_convolution_and_the_head(tiny_bundle):
    import openvino as ov

    from lineside.export.quantize import openvino_float_ends

    bundle, _ = tiny_bundle
    model = ov.Core().read_model(str(bundle / "model_fp32.xml"))
    names = openvino_float_ends(model)
    types = {op.get_friendly_name(): op.get_type_name() for op in model.get_ordered_ops()}
    assert [types[n] for n in names] == ["Convolution", "MatMul"]
    first_conv = next(op for op in model.get_ordered_ops() if op.get_type_name() == "Convolution")
    assert names[0] == first_conv.get_friendly_name()


@pytest.fixture(scope="module")
def int8_bundle(tiny_run, synth_test_dir, tmp_path_factory):
    """Both INT8 models of the tiny run, with the gate wide open: the tiny model is too
    fragile for a 0.5-point gate to be a fair test of the files (the gate has its own tests)."""
    run, _ = tiny_run
    out = tmp_path_factory.mktemp("int8")
    return out, export_bundle(run, out, eval_data=synth_test_dir, max_drop=100.0, min_agreement=0.0)


def test_int8_model_is_written_checked_and_usable(int8_bundle, synth_test_dir):
    out, result = int8_bundle
    q = result["report"]["int8"]["openvino"]
    doc = json.loads((out / "bundle.json").read_text())
    assert q["verdict"] == "kept" and q["gate"]["n"] == 50
    fp32_bytes = doc["models"]["openvino_fp32"]["files"]["model_fp32.bin"]["bytes"]
    assert doc["models"]["openvino_int8"]["files"]["model_int8.bin"]["bytes"] < 0.35 * fp32_bytes
    res = CliRunner().invoke(main, ["eval", str(out), str(synth_test_dir), "--precision", "int8", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert r["model"].endswith("model_int8.xml")
    # the gate's figure is the one eval reports for the same images
    assert r["balanced_accuracy"] == pytest.approx(q["gate"]["int8_balanced_accuracy"])


def test_gate_refuses_a_broken_int8_model(tiny_run, tmp_path, monkeypatch):
    run, _ = tiny_run

    def broken(xml, x):  # an "INT8 model" that always answers the first class
        p = np.zeros((len(x), 5), np.float32)
        p[:, 0] = 1
        return p

    monkeypatch.setattr(bundle_mod, "_run_openvino_int8", broken)
    res = export_bundle(run, tmp_path, formats=["openvino"])
    q = res["report"]["int8"]["openvino"]
    assert q["verdict"] == "refused" and "FP32 kept" in q["why"] and "balanced accuracy" in q["why"]
    assert [a["recipe"] for a in q["attempts"]] == [name for name, _ in RECIPES]
    assert not (tmp_path / "model_int8.xml").exists() and not (tmp_path / "model_int8.bin").exists()
    doc = json.loads((tmp_path / "bundle.json").read_text())
    assert set(doc["models"]) == {"openvino_fp32"}


def test_onnxruntime_int8_is_written_checked_and_self_describing(int8_bundle, synth_test_dir):
    out, result = int8_bundle
    q = result["report"]["int8"]["onnxruntime"]
    doc = json.loads((out / "bundle.json").read_text())
    assert q["verdict"] == "kept" and (out / "export_report.md").read_text().count("## INT8 for") == 2
    sizes = result["report"]["models"]
    assert sizes["onnx_int8"]["bytes"] < 0.35 * sizes["onnx_fp32"]["bytes"]
    res = CliRunner().invoke(main, ["eval", str(out), str(synth_test_dir), "--backend", "onnxruntime",
                                    "--precision", "int8", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert r["model"].endswith("model_int8.onnx")
    assert r["balanced_accuracy"] == pytest.approx(q["gate"]["int8_balanced_accuracy"])
    from lineside.runtime.model import open_model

    m = open_model(out / "model_int8.onnx")
    assert m.metadata["provenance"]["precision"] == "int8" and m.labels == doc["metadata"]["labels"]


def test_gate_refuses_a_broken_onnxruntime_int8_model(tiny_run, tmp_path, monkeypatch):
    run, _ = tiny_run
    monkeypatch.setattr(bundle_mod, "_run_onnxruntime_int8",
                        lambda path, x: np.eye(5, dtype=np.float32)[np.zeros(len(x), int)])
    res = export_bundle(run, tmp_path, formats=["onnx"])
    q = res["report"]["int8"]["onnxruntime"]
    assert q["verdict"] == "refused" and [a["recipe"] for a in q["attempts"]] == [n for n, _ in ORT_RECIPES]
    assert not (tmp_path / "model_int8.onnx").exists()
    assert set(json.loads((tmp_path / "bundle.json").read_text())["models"]) == {"onnx_fp32"}


def test_bias_correction_removes_the_mean_shift_of_int8_weights(tmp_path):
    """A convolution whose inputs have a large mean: rounding its weights to int8 shifts
    every output channel's mean by (W_q - W) . E[x]; the corrected biases undo that."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper
    from onnxruntime import quantization as q

    from lineside.export.quantize import correct_conv_biases

    rng = np.random.default_rng(0)
    w = (rng.normal(0, 0.05, (8, 3, 3, 3)) + 0.013).astype(np.float32)
    b = rng.normal(0, 0.1, 8).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])], "conv",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 3, 16, 16])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 8, 16, 16])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    fp32_path, int8_path = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(model, fp32_path)
    x = (40 + rng.normal(0, 4, (32, 3, 16, 16))).astype(np.float32)   # inputs far from zero mean

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x": x[i:i + 1]} for i in range(len(x))])

        def get_next(self):
            return next(self.items, None)

    q.quantize_static(str(fp32_path), str(int8_path), Reader(), quant_format=q.QuantFormat.QOperator,
                      activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8, per_channel=True,
                      extra_options={"WeightSymmetric": True})

    def channel_shift(m):
        y8 = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        y32 = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        return np.abs((y8 - y32)[:, :, 1:-1, 1:-1].mean(axis=(0, 2, 3)))   # away from the zero padding

    quantized = onnx.load(int8_path)
    before = channel_shift(quantized)
    assert correct_conv_biases(model, quantized, x) == 1
    after = channel_shift(quantized)
    assert after.sum() < 0.3 * before.sum()
