"""INT8: quantized OpenVINO models are kept only when they keep FP32's accuracy."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from lineside.cli import main
from lineside.export import bundle as bundle_mod
from lineside.export.bundle import export_bundle
from lineside.export.quantize import RECIPES, int8_gate


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


def test_int8_model_is_written_checked_and_usable(tiny_bundle, synth_test_dir):
    out, result = tiny_bundle
    q = result["report"]["int8"]["openvino"]
    assert q["verdict"] in ("kept", "refused")
    doc = json.loads((out / "bundle.json").read_text())
    if q["verdict"] == "refused":  # the tiny model may be too fragile; then nothing may be left behind
        assert "openvino_int8" not in doc["models"] and not (out / "model_int8.xml").exists()
        pytest.skip("tiny model's INT8 was refused by the gate")
    assert q["gate"]["drop_points"] <= 0.5
    fp32_bytes = doc["models"]["openvino_fp32"]["files"]["model_fp32.bin"]["bytes"]
    assert doc["models"]["openvino_int8"]["files"]["model_int8.bin"]["bytes"] < 0.35 * fp32_bytes
    res = CliRunner().invoke(main, ["eval", str(out), str(synth_test_dir), "--precision", "int8", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["model"].endswith("model_int8.xml")


def test_gate_refuses_a_broken_int8_model(tiny_run, tmp_path, monkeypatch):
    run, _ = tiny_run

    def broken(xml, x):  # an "INT8 model" that always answers the first class
        p = np.zeros((len(x), 5), np.float32)
        p[:, 0] = 1
        return p

    monkeypatch.setattr(bundle_mod, "_run_openvino_int8", broken)
    res = export_bundle(run, tmp_path, formats=["openvino"])
    q = res["report"]["int8"]["openvino"]
    assert q["verdict"] == "refused" and "FP32 kept" in q["why"]
    assert [a["recipe"] for a in q["attempts"]] == [name for name, _ in RECIPES]
    assert not (tmp_path / "model_int8.xml").exists() and not (tmp_path / "model_int8.bin").exists()
    doc = json.loads((tmp_path / "bundle.json").read_text())
    assert set(doc["models"]) == {"openvino_fp32"}
