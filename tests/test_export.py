"""FP32 export: self-describing ONNX / OpenVINO models whose outputs match PyTorch."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from lineside.cli import main
from lineside.errors import LinesideError
from lineside.export import bundle as bundle_mod
from lineside.export.bundle import export_bundle, model_metadata
from lineside.metadata import ModelMetadata
from lineside.runtime.model import sha256
from lineside.runtime.model import open_model
from lineside.train.checkpoint import load_checkpoint


@pytest.fixture()
def bundle(tiny_bundle):
    return tiny_bundle


def test_bundle_files_and_checksums(bundle):
    out, result = bundle
    doc = json.loads((out / "bundle.json").read_text())
    assert doc["bundle_schema"] == 1 and doc["parity_passed"] is True
    names = {n for m in doc["models"].values() for n in m["files"]}
    int8 = {"model_int8.xml", "model_int8.bin"} if "openvino_int8" in doc["models"] else set()
    int8 |= {"model_int8.onnx"} if "onnx_int8" in doc["models"] else set()
    assert names == {"model_fp32.onnx", "model_fp32.xml", "model_fp32.bin"} | int8
    for entry in doc["models"].values():
        for name, f in entry["files"].items():
            assert f["sha256"] == sha256(out / name) and f["bytes"] == (out / name).stat().st_size


def test_metadata_round_trips_through_both_model_files(bundle, tiny_run):
    out, result = bundle
    run, _ = tiny_run
    from lineside.export.bundle import training_size

    data = json.loads((run / "metrics.json").read_text())["data"]
    expected = model_metadata(load_checkpoint(run), run, "fp32", training_size(data))
    assert expected.provenance["train_image_size"] == [64, 64]      # the runtime compares frames with it
    from_onnx = open_model(out / "model_fp32.onnx", backend="onnxruntime").metadata
    from_ir = open_model(out / "model_fp32.xml", backend="openvino").metadata
    from_bundle = ModelMetadata.from_dict(json.loads((out / "bundle.json").read_text())["metadata"])
    for meta in (from_onnx, from_ir, from_bundle):
        assert meta == expected and meta.to_dict() == expected.to_dict()
    doc = from_onnx.to_dict()
    assert doc["labels"] == ["card", "cube", "hat", "screw", "torch"] and doc["schema"] == "lineside.model/2"
    assert doc["input"]["dtype"] == "uint8" and doc["input"]["spec"]["height"] == 64 and "input_spec" not in doc
    assert from_onnx.precision == "fp32"


def test_metadata_is_validated_and_the_first_schema_is_still_read():
    """The input is described once (schema 2); a schema-1 document (input block and
    input_spec beside it) still reads; bad labels, views or thresholds are refused."""
    from lineside.spec import InputSpec

    spec = InputSpec(64, 64)
    meta = ModelMetadata(("ok", "scratch"), spec, test_views=(0, 1, 2, 3), reject_below=0.5)
    assert ModelMetadata.from_json(meta.to_json()) == meta
    old = {"schema": "lineside.model/1", "labels": ["ok", "scratch"], "input_spec": spec.to_dict(),
           "input": {"name": "image", "height": 64, "width": 64}, "thresholds": {"reject_below": None},
           "test_views": None, "provenance": {"precision": "int8"}}
    assert ModelMetadata.from_dict(old).spec == spec and ModelMetadata.from_dict(old).precision == "int8"
    for bad, needle in ((dict(old, schema="lineside.model/9"), "schema"), (dict(old, labels=["ok", "ok"]), "label"),
                        (dict(old, test_views=[9]), "test views"),
                        (dict(old, thresholds={"reject_below": 2}), "reject_below")):
        with pytest.raises(LinesideError, match=needle):
            ModelMetadata.from_dict(bad, "x.onnx")


def test_parity_with_pytorch_on_real_images(bundle):
    _, result = bundle
    parity = result["report"]["parity"]
    assert "images from" in parity["images"]
    assert set(parity["results"]) == {"onnxruntime_fp32", "openvino_fp32"}
    for r in parity["results"].values():
        assert r["max_abs_diff"] <= 1e-4 and r["top1_agreement"] == 1.0


def test_export_fails_when_a_runtime_disagrees(tiny_run, tmp_path, monkeypatch):
    run, _ = tiny_run
    real = bundle_mod._run_openvino

    def drifting(xml, x):  # a model that moved probabilities by 1e-3
        p = real(xml, x)
        return np.abs(p + np.where(np.arange(p.shape[1]) == 0, 1e-3, -1e-3)).astype(np.float32)

    monkeypatch.setattr(bundle_mod, "_run_openvino", drifting)
    with pytest.raises(LinesideError, match="openvino_fp32.*disagrees|disagrees.*openvino_fp32"):
        export_bundle(run, tmp_path)
    assert json.loads((tmp_path / "bundle.json").read_text())["parity_passed"] is False


def test_onnx_without_lineside_metadata_is_a_clear_error(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    # IR 8, opset 17: an onnx newer than the installed onnxruntime writes versions it cannot load
    onnx.save(helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)]),
              str(tmp_path / "plain.onnx"))
    with pytest.raises(LinesideError, match="plain.onnx.*no lineside metadata"):
        open_model(tmp_path / "plain.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(LinesideError, match="junk.onnx"):
        open_model(tmp_path / "junk.onnx")


def test_export_cli(tiny_run, tmp_path):
    run, _ = tiny_run
    runner = CliRunner()
    res = runner.invoke(main, ["export", str(run), "--out", str(tmp_path / "b"), "--formats", "onnx"])
    assert res.exit_code == 0, res.output
    assert "parity onnxruntime_fp32" in res.output
    names = {p.name for p in (tmp_path / "b").iterdir()}
    assert names - {"model_int8.onnx"} == {"bundle.json", "export_report.json", "export_report.md", "model_fp32.onnx"}
    assert "FPS" in res.output and "ms per image" in res.output   # latency and throughput of each model
    res = runner.invoke(main, ["export", str(run), "--out", str(tmp_path / "c"), "--formats", "tflite"])
    assert res.exit_code == 2 and "tflite" in res.output


def test_export_replaces_an_existing_bundle_only_with_force(tiny_run, tmp_path):
    run, _ = tiny_run
    out = tmp_path / "b"
    export_bundle(run, out, int8=False)
    stale = out / "model_int8.xml"          # a model of the old bundle that the new one will not have
    stale.write_text("<old/>")
    doc = json.loads((out / "bundle.json").read_text())
    doc["models"]["openvino_int8"] = {"files": {"model_int8.xml": {"sha256": "0", "bytes": 6}}}
    (out / "bundle.json").write_text(json.dumps(doc))
    operator_note = out / "notes.txt"
    operator_note.write_text("mine")
    with pytest.raises(LinesideError, match="--out .*already holds a bundle.*--force"):
        export_bundle(run, out, int8=False, formats=["onnx"])
    assert (out / "model_fp32.xml").exists()    # refused: nothing touched
    export_bundle(run, out, int8=False, formats=["onnx"], force=True)
    assert not stale.exists() and not (out / "model_fp32.xml").exists() and operator_note.exists()
    assert set(json.loads((out / "bundle.json").read_text())["models"]) == {"onnx_fp32"}


def test_openvino_model_api_loads_a_lineside_ir_as_it_is(tiny_bundle, synth_test_dir):
    """The IR carries Model API's model_info: its ClassificationModel loads it with no
    configuration and gives lineside's label on BGR frames from OpenCV."""
    import cv2
    from model_api.models import ClassificationModel

    from lineside.runtime.model import open_model
    from lineside.spec import resize_to_spec

    bundle, _ = tiny_bundle
    ours = open_model(bundle, backend="openvino")
    theirs = ClassificationModel.create_model(str(bundle / "model_fp32.xml"), preload=True)
    files = sorted(synth_test_dir.rglob("*.png"))[:12]
    agree = 0
    for f in files:
        frame = cv2.imread(str(f))
        label = theirs(frame).top_labels[0].name
        p = ours.predict_proba(resize_to_spec(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), ours.spec)[None])[0]
        agree += label == ours.labels[int(p.argmax())]
    assert agree == len(files)
    assert theirs.params.labels == [label.replace(" ", "_") for label in ours.labels]


def test_converting_a_model_sends_no_telemetry(tmp_path):
    """OpenVINO's converter (export, and scoring a run on the CPU) and NNCF would write a
    client id under ~/intel and post usage statistics: lineside blocks their telemetry."""
    code = ("import lineside, torch, openvino as ov, nncf, sys\n"
            "ov.convert_model(torch.nn.Conv2d(3, 4, 3), example_input=torch.zeros(1, 3, 8, 8))\n"
            "print(sys.modules.get('openvino_telemetry'))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env={**env, "HOME": str(tmp_path)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "None" and not (tmp_path / "intel").exists()
