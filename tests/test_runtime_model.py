"""Exported models scored and used without torch; bad bundles are one-line errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from lineside.cli import main
from lineside.runtime.model import open_model


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_bundle_eval_matches_the_pytorch_run(tiny_run, tiny_bundle, synth_test_dir, backend):
    run, _ = tiny_run
    bundle, _ = tiny_bundle
    runner = CliRunner()
    ref = json.loads(runner.invoke(main, ["eval", str(run), str(synth_test_dir), "--json"]).output)
    res = runner.invoke(main, ["eval", str(bundle), str(synth_test_dir), "--json", "--backend", backend])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert got["backend"] == backend and ref["backend"] == "pytorch"
    assert got["confusion_matrix"] == ref["confusion_matrix"]
    assert got["balanced_accuracy"] == ref["balanced_accuracy"]


@pytest.mark.parametrize("name", ["model_fp32.xml", "model_fp32.onnx"])
def test_many_images_stream_through_the_one_image_engine_in_order(tiny_bundle, name):
    """OpenVINO and ONNX Runtime score a set of images through the throughput engine's
    requests in turn (runtime.model.stream), all at once: each image's answer where it
    belongs, as the same image alone gets it, also when the count is not a multiple of the
    requests or of a batch; progress counts every image; none gives (0, classes)."""
    import numpy as np

    from lineside.runtime.model import Engine, stream

    bundle, _ = tiny_bundle
    m = open_model(bundle / name)
    x = np.random.default_rng(0).integers(0, 256, (37, 64, 64, 3), dtype=np.uint8)
    alone = np.concatenate([m.predict_proba(x[i:i + 1]) for i in range(len(x))])
    counted = []
    assert np.array_equal(m.predict_proba(x, progress=counted.append), alone)
    assert sum(counted) == len(x) and len(counted) == len(x)      # one image at a time, not batches of 32
    assert np.array_equal(m.whole(x[:5]), alone[:5])
    assert m.predict_proba(x[:0]).shape == (0, 5)

    class Echo(Engine):       # answers each image with its own first pixel
        depth = 3

        def __init__(self):
            self.held = {}

        def submit(self, slot, x=None):
            assert slot not in self.held      # a request is read before it is reused
            self.held[slot] = x[0, 0, 0].astype(np.float32)

        def wait(self, slot):
            return self.held.pop(slot)

    got = stream(Echo(), x[:7], (3,))
    assert np.array_equal(got, x[:7, 0, 0].astype(np.float32))


def test_a_device_that_refuses_the_throughput_hint_scores_with_the_latency_engine(tiny_bundle, monkeypatch):
    import numpy as np
    import openvino as ov

    bundle, _ = tiny_bundle
    x = np.random.default_rng(1).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    expected = open_model(bundle / "model_fp32.xml").predict_proba(x)
    real, hints = ov.Core.compile_model, []

    def picky(self, model, device=None, config=None):
        hints.append((config or {}).get("PERFORMANCE_HINT"))
        if hints[-1] == "THROUGHPUT":
            raise RuntimeError("this device takes no throughput hint")
        return real(self, model, device, config)

    monkeypatch.setattr(ov.Core, "compile_model", picky)
    assert np.array_equal(open_model(bundle / "model_fp32.xml").predict_proba(x), expected)
    assert hints == ["THROUGHPUT", "LATENCY"]


def test_lone_model_file_is_self_describing(tiny_bundle, synth_test_dir):
    bundle, _ = tiny_bundle
    for name in ("model_fp32.onnx", "model_fp32.xml"):
        m = open_model(bundle / name)
        assert m.labels == ["card", "cube", "hat", "screw", "torch"] and m.spec.size == (64, 64)
    res = CliRunner().invoke(main, ["predict", str(bundle / "model_fp32.xml"), str(synth_test_dir / "cube"), "--json"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.output)) == 10
    res = CliRunner().invoke(main, ["predict", str(bundle / "model_fp32.xml"), str(synth_test_dir / "cube"),
                                    "--backend", "onnxruntime"])
    assert res.exit_code == 2 and "--backend openvino" in res.output


def test_scoring_an_exported_model_never_imports_torch(tiny_bundle, synth_test_dir):
    bundle, _ = tiny_bundle
    code = (
        "import sys\n"
        "from lineside.cli import main\n"
        f"args = ['eval', {str(bundle)!r}, {str(synth_test_dir)!r}, '--json', '--quiet']\n"
        "try:\n    main(args)\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('TORCH' if 'torch' in sys.modules else 'CLEAN')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("CLEAN")


def _broken(bundle, tmp_path, how):
    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    if how == "missing":
        (b / "model_fp32.bin").unlink()
    elif how == "checksum":
        with open(b / "model_fp32.onnx", "ab") as f:
            f.write(b"\0")
    elif how == "schema":
        doc = json.loads((b / "bundle.json").read_text())
        doc["bundle_schema"] = 99
        (b / "bundle.json").write_text(json.dumps(doc))
    elif how == "not-json":
        (b / "bundle.json").write_text("{not json")
    elif how == "no-bundle":
        (b / "bundle.json").unlink()
    return b


@pytest.mark.parametrize("how,backend,needle", [
    ("missing", "openvino", "model_fp32.bin is missing"),
    ("checksum", "onnxruntime", "checksum does not match"),
    ("schema", "auto", "bundle schema 99 is not supported"),
    ("not-json", "auto", "unreadable bundle.json"),
    ("no-bundle", "auto", "not a bundle"),
])
def test_bad_bundles_are_one_line_errors(tiny_bundle, synth_test_dir, tmp_path, how, backend, needle):
    bundle, _ = tiny_bundle
    b = _broken(bundle, tmp_path, how)
    if how == "no-bundle":  # named directly, a missing bundle.json says so
        args = ["predict", str(b / "bundle.json"), str(synth_test_dir)]
    else:
        args = ["eval", str(b), str(synth_test_dir), "--backend", backend]
    res = CliRunner().invoke(main, args)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], res.output


def test_model_without_lineside_metadata_is_refused(tmp_path, synth_test_dir):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 64, 64, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 64, 64, 3])])
    onnx.save(helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)]),  # any onnxruntime
              str(tmp_path / "plain.onnx"))
    for backend in ("onnxruntime", "openvino"):
        res = CliRunner().invoke(main, ["eval", str(tmp_path / "plain.onnx"), str(synth_test_dir),
                                        "--backend", backend])
        assert res.exit_code == 2 and "no lineside metadata" in res.output, res.output


def test_an_onnx_model_with_external_weights_is_refused(tiny_bundle, tmp_path):
    """Weights in a separate file are in no checksum: a doctored weights file would change
    the answers. The model is loaded from its own (hashed) bytes, so it cannot reach one."""
    import onnx

    from lineside.errors import LinesideError
    from lineside.runtime.model import sha256

    bundle, _ = tiny_bundle
    model = onnx.load(str(bundle / "model_fp32.onnx"))
    out = tmp_path / "external.onnx"
    onnx.save(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin",
              size_threshold=0)
    assert (tmp_path / "weights.bin").stat().st_size > 1000
    with pytest.raises(LinesideError, match=r"external\.onnx: ONNX Runtime cannot load this model \(.+: .+\)"):
        open_model(out)
    # OpenVINO, given the bytes, would look for weights.bin in the working directory
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(LinesideError, match=r"external\.onnx: OpenVINO cannot read this model .*external data"):
            open_model(out, backend="openvino")
    finally:
        os.chdir(cwd)
    # the same model in one file opens, and its checksum is that of the file
    one = open_model(bundle / "model_fp32.onnx")
    assert one.checksum == sha256(bundle / "model_fp32.onnx")


def test_runtime_errors_keep_the_library_reason(tiny_bundle, tmp_path):
    """A damaged IR names what OpenVINO found wrong, on one line, without its C++ locations."""
    bundle, _ = tiny_bundle
    xml = tmp_path / "model.xml"
    xml.write_text((bundle / "model_fp32.xml").read_text()[:400])
    shutil.copy(bundle / "model_fp32.bin", tmp_path / "model.bin")
    res = CliRunner().invoke(main, ["run", str(xml), "--source", str(tmp_path), "--log", "none"])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert "OpenVINO cannot read this model (" in lines[0] and "src/" not in lines[0]
    assert "mismatch at offset" in lines[0]     # pugixml's own words
