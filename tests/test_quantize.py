"""INT8: quantized OpenVINO models are kept only when they keep FP32's accuracy."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from lineside.cli import main
from lineside.dataset import load_arrays, load_image_set
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


def test_linear_convolutions_are_those_that_feed_no_activation(tiny_bundle):
    """The float-linear recipes keep in float the convolutions whose output goes to no
    activation: in Lite0 exactly the projections that end each inverted-residual block,
    found alike in the ONNX graph and in the OpenVINO IR."""
    import onnx
    import openvino as ov

    from lineside.export.quantize import float_nodes, openvino_linear_convs

    bundle, _ = tiny_bundle
    model = onnx.load(str(bundle / "model_fp32.onnx"))
    extra = [n for n in float_nodes(model, linear_convs=True) if n not in float_nodes(model)]
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert extra and all("_project_conv" in n for n in extra)
    assert {n for n in convs if "_project_conv" in n} == set(extra)
    ir = openvino_linear_convs(ov.Core().read_model(str(bundle / "model_fp32.xml")))
    assert len(ir) == len(extra) and all("_project_conv" in n for n in ir)


def test_first_block_is_the_stem_and_the_first_depthwise_convolution(tiny_bundle):
    """The float-first-block recipe keeps the two convolutions whose rounding the rest of
    the network carries furthest: the stem and the first depthwise convolution, nothing else."""
    import onnx

    from lineside.export.quantize import first_block_convs, float_nodes

    bundle, _ = tiny_bundle
    model = onnx.load(str(bundle / "model_fp32.onnx"))
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    names = first_block_convs(model)
    assert names[0] == convs[0].name
    assert len(names) == 2 and "_depthwise_conv" in names[1]
    assert names[1] == next(n.name for n in convs if "_depthwise_conv" in n.name)
    extra = [n for n in float_nodes(model, first_block=True) if n not in float_nodes(model)]
    assert extra == names
    both = float_nodes(model, ends=True, first_block=True)
    assert len(both) == len(set(both))


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
    # the linear convolutions stay in float (RECIPES): their weights are most of what is left
    assert doc["models"]["openvino_int8"]["files"]["model_int8.bin"]["bytes"] < 0.7 * fp32_bytes
    res = CliRunner().invoke(main, ["eval", str(out), str(synth_test_dir), "--precision", "int8", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert r["model"].endswith("model_int8.xml")
    # the gate's figure is the one eval reports for the same images
    assert r["balanced_accuracy"] == pytest.approx(q["gate"]["int8_balanced_accuracy"])


def _quantizers_before_the_first_convolution(xml) -> list[str]:
    """FakeQuantize operations on the way from the input to the first convolution."""
    import openvino as ov

    ops = ov.Core().read_model(str(xml)).get_ordered_ops()
    first = next(op for op in ops if op.get_type_name() == "Convolution")
    seen, todo, found = set(), [first.input_value(0).get_node()], []
    while todo:
        node = todo.pop()
        if node.get_friendly_name() in seen or node.get_type_name() == "Constant":
            continue
        seen.add(node.get_friendly_name())
        if node.get_type_name() == "FakeQuantize":
            found.append(node.get_friendly_name())
        todo += [i.get_source_output().get_node() for i in node.inputs()]
    return found


def test_openvino_int8_keeps_the_preprocessing_and_the_views_in_float(synth_dir, synth_test_dir, tmp_path,
                                                                       monkeypatch):
    """The in-graph normalisation and the test-time views (slices, turns, concatenation) of
    today's default model stay in float, as in ONNX Runtime's recipe: quantizers there
    changed 1.2% of NEU's labels on their own. Without openvino_preprocessing NNCF puts
    them there."""
    import openvino as ov

    from lineside.export import quantize
    from lineside.runtime.model import open_model
    from lineside.train.config import TrainConfig
    from lineside.train.run import train_run
    from conftest import TINY

    run, bundle = tmp_path / "run", tmp_path / "bundle"
    train_run(synth_dir, run, TrainConfig(strategy="linear", taps="mid", **{**TINY, "views": None}), progress=False)
    export_bundle(run, bundle, formats=["openvino"], int8=False, speed_seconds=0)
    fp32 = open_model(bundle, backend="openvino")
    assert fp32.metadata.test_views == (0, 1, 2, 3)
    x, _, _ = load_arrays(load_image_set(synth_test_dir), fp32.spec, progress=False)
    meta = fp32.metadata.with_precision("int8")
    recipe = dict(quantize.RECIPES[0][1])
    kept = quantize.quantize_openvino(bundle / "model_fp32.xml", tmp_path / "kept.xml", x, meta, recipe)
    assert not _quantizers_before_the_first_convolution(kept)
    kinds = [op.get_type_name() for op in ov.Core().read_model(str(kept)).get_ordered_ops()]
    assert kinds.count("FakeQuantize") >= 5          # the rest of the network is quantized
    monkeypatch.setattr(quantize, "openvino_preprocessing", lambda model: [])
    unkept = quantize.quantize_openvino(bundle / "model_fp32.xml", tmp_path / "unkept.xml", x, meta, recipe)
    assert _quantizers_before_the_first_convolution(unkept)


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
    # the refusal says how many recipes were tried, each reason on its own, and what to do next
    assert f"({len(RECIPES)} recipe" in q["why"] and "every recipe" not in q["why"]
    assert q["reasons"] and all(r.startswith("INT8 ") for r in q["reasons"]) and "--eval DIR" in q["next"]
    # and a run that asks for the INT8 model learns that the gate refused it, and where to read why
    from lineside.errors import LinesideError
    from lineside.runtime.model import open_model

    with pytest.raises(LinesideError, match=r"INT8 gate: openvino refused .*export_report.md.*--precision fp32"):
        open_model(tmp_path, backend="openvino", precision="int8")


def test_onnxruntime_int8_is_written_checked_and_self_describing(int8_bundle, synth_test_dir):
    out, result = int8_bundle
    q = result["report"]["int8"]["onnxruntime"]
    doc = json.loads((out / "bundle.json").read_text())
    assert q["verdict"] == "kept" and (out / "export_report.md").read_text().count("## INT8 for") == 2
    sizes = result["report"]["models"]
    # the linear convolutions stay in float (ORT_RECIPES): their weights are most of what is left
    assert sizes["onnx_int8"]["bytes"] < 0.7 * sizes["onnx_fp32"]["bytes"]
    res = CliRunner().invoke(main, ["eval", str(out), str(synth_test_dir), "--backend", "onnxruntime",
                                    "--precision", "int8", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert r["model"].endswith("model_int8.onnx")
    assert r["balanced_accuracy"] == pytest.approx(q["gate"]["int8_balanced_accuracy"])
    from lineside.runtime.model import open_model

    m = open_model(out / "model_int8.onnx")
    assert m.metadata.precision == "int8" and m.labels == doc["metadata"]["labels"]


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


def _fingerprints(x):
    return {hash(im.tobytes()) for im in x}


def test_default_gate_refuses_int8_that_is_right_only_on_its_calibration_images(tiny_run, tmp_path, monkeypatch):
    """An "INT8 model" that gives FP32's answers on the images it was calibrated on and a
    wrong class on every other image: without --eval the default export must still refuse
    it, because INT8 is judged on the run's validation images, which the quantizer never saw."""
    run, _ = tiny_run
    seen, calibs = set(), []
    real_quantize = bundle_mod._int8_targets

    def targets(files):
        out = real_quantize(files)
        for t in out:
            quantize = t["quantize"]

            def recording(src, dst, calib, meta, recipe, quantize=quantize):
                seen.update(_fingerprints(calib))
                calibs.append(calib)
                return quantize(src, dst, calib, meta, recipe)
            t["quantize"] = recording
        return out

    def memorised(xml, x):
        p = bundle_mod._run_openvino(xml.with_name("model_fp32.xml"), x)
        wrong = np.eye(p.shape[1], dtype=np.float32)[(p.argmax(1) + 1) % p.shape[1]]
        known = np.array([hash(im.tobytes()) in seen for im in x])
        return np.where(known[:, None], p, wrong)

    monkeypatch.setattr(bundle_mod, "_int8_targets", targets)
    monkeypatch.setattr(bundle_mod, "_run_openvino_int8", memorised)
    res = export_bundle(run, tmp_path, formats=["openvino"])
    q = res["report"]["int8"]["openvino"]
    assert q["verdict"] == "refused" and q["judged"]["held_out"] is True
    assert "validation images of the run" in q["eval_images"]
    assert not (tmp_path / "model_int8.xml").exists()
    # the validation images were judged and never calibrated on
    from lineside.dataset import load_arrays, load_image_set
    from lineside.spec import InputSpec

    spec = InputSpec.from_dict(json.loads((run / "metrics.json").read_text())["input_spec"])
    x_val, _, _ = load_arrays(load_image_set(run / "validation.csv"), spec, progress=False)
    assert len(x_val) and not _fingerprints(x_val) & seen
    # judged on its own calibration images (the old default), the same model had passed
    calib = calibs[-1]
    fp32 = bundle_mod._run_openvino(tmp_path / "model_fp32.xml", calib)
    assert bundle_mod.int8_gate(np.zeros(len(calib), int), fp32, memorised(tmp_path / "model_int8.xml", calib),
                                ["a", "b", "c", "d", "e"], max_drop=0.5, min_agreement=99.0)["top1_agreement"] == 1.0


def test_held_out_judgement_splits_each_class_and_judges_augmented_copies():
    from lineside.export.bundle import MAX_JUDGE_VIEWS, held_out_judgement
    from lineside.train.augment import AugmentConfig

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    y = np.repeat([0, 1, 2], 4)
    paths = [f"img{i}.png" for i in range(12)]
    x_cal, (x_judge, y_judge, names), judged = held_out_judgement(x, y, paths, AugmentConfig())
    views = MAX_JUDGE_VIEWS    # 6 held-out images: as many copies as allowed
    assert judged["held_out"] is True and len(x_cal) == 6 and len(x_judge) == 6 * views
    assert not _fingerprints(x_cal) & _fingerprints(x_judge)          # nothing judged was calibrated on
    assert np.bincount(y_judge).tolist() == [2 * views] * 3       # every class judged
    assert len(_fingerprints(x_judge)) > 0.9 * len(x_judge)            # the copies differ from the images
    assert len(names) == len(x_judge) and "augmented copy" in names[-1]

    x_cal, (x_judge, _, _), judged = held_out_judgement(x[[0, 4, 8]], y[[0, 4, 8]], paths[:3], AugmentConfig())
    assert judged["held_out"] is False and len(x_judge) == len(x_cal) == 3 and "--eval" in judged["why"]


def test_export_says_in_its_int8_line_what_int8_was_judged_on(tiny_run, tmp_path):
    run, _ = tiny_run
    res = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "b"), "--formats", "openvino",
                                    "--speed-seconds", "0", "--quiet"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    start = next(i for i, s in enumerate(lines) if s.startswith("INT8 openvino"))
    block = [lines[start]] + [s for s in lines[start + 1:start + 8] if s.startswith("  ")]   # a refusal's list
    text = "\n".join(block)
    assert "validation images of the run" in text and "WARNING" not in text


@pytest.fixture(scope="module")
def runs_without_validation(synth_dir, tmp_path_factory):
    """A head on frozen features and a fine-tuned network, both trained on every image."""
    from lineside.train.config import TrainConfig
    from lineside.train.run import train_run

    from conftest import TINY

    runs = {}
    for strategy in ("linear", "finetune"):
        out = tmp_path_factory.mktemp(strategy)
        train_run(synth_dir, out, TrainConfig(strategy=strategy, val_fraction=0.0, **TINY), progress=False)
        runs[strategy] = out
    return runs


def test_a_head_on_frozen_features_without_validation_is_judged_out_of_fold(runs_without_validation, tmp_path):
    """Its INT8 head is fitted again on INT8 features (tests/test_refit.py) and judged on
    out-of-fold predictions of the training images; the line says so."""
    run = runs_without_validation["linear"]
    assert not (run / "validation.csv").exists()
    res = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "b"), "--formats", "openvino",
                                    "--speed-seconds", "0", "--quiet"])
    assert res.exit_code == 0, res.output
    said = res.output[res.output.index("INT8 openvino"):]
    assert "out-of-fold predictions of" in said and "WARNING" not in said


def test_onnxruntime_quantization_does_not_warn_about_the_integer_view_indices(runs_without_validation, tmp_path,
                                                                               caplog):
    """ONNX Runtime's quantizer warns, on the root logger, about every tensor it leaves alone
    because it is not float: in a head on several stages with test-time views, the int64
    size that splits the views apart again. That is as it should be, and printed on every
    export it read as a failure, so it is dropped; its other warnings still pass."""
    import logging

    from lineside.export.quantize import _IntegerTensorNote, quantize_onnxruntime
    from lineside.runtime.model import open_model

    export_bundle(runs_without_validation["linear"], tmp_path / "b", formats=["onnx"], int8=False)
    fp32 = tmp_path / "b" / "model_fp32.onnx"
    calib = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    with caplog.at_level(logging.WARNING):
        quantize_onnxruntime(fp32, tmp_path / "q.onnx", calib, open_model(fp32).metadata, dict(ORT_RECIPES)[
            ORT_RECIPES[0][0]])
    assert (tmp_path / "q.onnx").is_file()
    assert not [r for r in caplog.records if "unsupported type to quantize" in r.getMessage()]
    note = _IntegerTensorNote()
    record = lambda msg: logging.LogRecord("root", logging.WARNING, __file__, 1, msg, None, None)   # noqa: E731
    about = "Inference failed or unsupported type to quantize for tensor 'g', type is tensor_type {\n  elem_type: "
    assert not note.filter(record(about + "7\n}."))
    assert note.filter(record(about + "1\n}.")) and note.filter(record("Please consider to run pre-processing"))
    assert note not in logging.getLogger().filters


def test_a_network_fine_tuned_on_every_image_gets_no_int8_without_held_out_images(
        runs_without_validation, synth_test_dir, tmp_path, monkeypatch):
    """Its own training images (and copies of them) cannot show what INT8 does to images it is
    unsure of, so without --eval INT8 is refused in one line that says what to pass; nothing
    is even quantized. With --eval the same run is judged and gets its INT8 model."""
    run = runs_without_validation["finetune"]
    quantized = []
    real = bundle_mod._int8_targets

    def targets(files):
        out = real(files)
        for t in out:
            t["quantize"] = (lambda *a, q=t["quantize"]: quantized.append(1) or q(*a))
        return out

    monkeypatch.setattr(bundle_mod, "_int8_targets", targets)
    res = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "b"), "--speed-seconds", "0",
                                    "--quiet"])
    assert res.exit_code == 0, res.output
    lines = [s for s in res.output.splitlines() if s.startswith("INT8 ")]
    assert len(lines) == 2 and all("refused" in s and "--eval DIR" in s and "FP32 kept" in s for s in lines)
    assert not quantized and not list((tmp_path / "b").glob("model_int8*"))
    assert "FP32 kept" in (tmp_path / "b" / "export_report.md").read_text()
    res = export_bundle(run, tmp_path / "c", formats=["openvino"], eval_data=synth_test_dir, max_drop=100,
                        min_agreement=0)
    assert quantized and res["report"]["int8"]["openvino"]["verdict"] == "kept"


def test_calibration_leaves_out_the_runs_validation_images(tiny_run, tmp_path):
    from lineside.dataset import load_image_set
    from lineside.export.bundle import _labelled_arrays
    from lineside.train.checkpoint import load_checkpoint

    run, metrics = tiny_run
    loaded = load_checkpoint(run)
    validation = load_image_set(run / "validation.csv")
    assert validation.counts() == metrics["val_counts"]
    _, _, every = _labelled_arrays(loaded, metrics["data"], None, False, "")
    _, _, calib = _labelled_arrays(loaded, metrics["data"], None, False, "", exclude=run / "validation.csv")
    assert len(calib) == len(every) - len(validation)
    assert not {p.resolve() for p in calib} & {p.resolve() for p in validation.paths}


def test_estimated_agreement_on_unseen_images_from_margin_shifts_and_out_of_fold_margins():
    """INT8 as FP32 plus noise on the logits, the same for every image: the label changes it
    causes among confident (training) images say little, yet their margin shifts and the
    margins of unseen images (out-of-fold) predict the changes on unseen images."""
    from lineside.export.quantize import margin_shifts, predicted_unseen
    from lineside.train.calibrate import softmax

    rng = np.random.default_rng(0)

    def images(n, spread):
        y = rng.integers(0, 3, n)
        z = rng.normal(0, 1, (n, 3))
        z[np.arange(n), y] += spread
        return z, y

    noise = 0.6
    seen, _ = images(300, 8.0)                      # the judged views: far from any boundary
    unseen, y_unseen = images(4000, 2.0)            # what the line brings
    oof, y_oof = images(400, 2.0)                   # out-of-fold: like unseen
    int8_seen = seen + rng.normal(0, noise, seen.shape)
    int8_unseen = unseen + rng.normal(0, noise, unseen.shape)
    direct = np.mean(seen.argmax(1) == int8_seen.argmax(1))
    truth = np.mean(unseen.argmax(1) == int8_unseen.argmax(1))
    est = predicted_unseen(margin_shifts(softmax(seen), softmax(int8_seen)), oof, y_oof, ["a", "b", "c"])
    assert direct > 0.99 and truth < 0.95               # judged directly, INT8 looks safe; it is not
    assert abs(est["agreement"] - truth) < 0.03
    assert est["drop_points"] > 1.0 and est["shifts"] == 300 and est["oof_images"] == 400
    same = predicted_unseen(margin_shifts(softmax(seen), softmax(seen)), oof, y_oof, ["a", "b", "c"])
    assert same["agreement"] == 1.0 and same["drop_points"] == 0.0


def test_an_estimate_of_unseen_images_does_not_keep_int8_that_changes_the_judged_views(tmp_path):
    """With out-of-fold predictions the gate estimates what INT8 does to unseen images, but
    the held-out views it measured must pass the same limits: views near the boundary that
    INT8 moves by very little still change label, and with few out-of-fold margins (all
    far from it) the estimate alone would say 100% agreement."""
    from types import SimpleNamespace

    n = 200
    y = np.repeat([0, 1], n // 2)
    p32 = np.where(y[:, None] == 0, [0.9, 0.1], [0.1, 0.9])
    close = np.arange(n) % 20 == 0                        # 5% of the views sit on the boundary
    p32[close] = np.where(y[close, None] == 0, [0.505, 0.495], [0.495, 0.505])
    oof = (np.where(np.repeat([0, 1], 10)[:, None] == 0, [4.0, 0.0], [0.0, 4.0]), np.repeat([0, 1], 10))

    def gated(p8):
        path = tmp_path / "model_int8.xml"
        t = {"runtime": "openvino", "src": "openvino_fp32", "key": "openvino_int8", "out": path.name,
             "recipes": RECIPES, "quantize": lambda src, dst, *a: dst.write_text("int8"),
             "run_fp32": lambda f, x: p32, "run_int8": lambda f, x: p8, "files": lambda p: [p]}
        return bundle_mod._gated_int8(t, SimpleNamespace(labels=["a", "b"]), {"openvino_fp32": [tmp_path / "f"]},
                                      tmp_path, None, None, np.zeros(n), y, None, {"source": "test"},
                                      (0.3, 99.5), oof)

    steady = gated(p32.copy())
    assert steady["verdict"] == "kept" and steady["gate"]["estimated"]["agreement"] == 1.0
    nudged = p32.copy()
    nudged[close] = nudged[close][:, ::-1]                # a shift of 0.04 in log-odds flips them
    moved = gated(nudged)
    assert moved["gate"]["estimated"]["agreement"] == 1.0        # the estimate alone would keep it
    assert moved["verdict"] == "refused" and "judged views" in moved["why"]
    assert not (tmp_path / "model_int8.xml").exists()


def test_the_gate_refuses_an_anomaly_int8_that_keeps_every_verdict_but_ranks_worse():
    """An anomaly model's INT8 may give every image FP32's verdict and still rank two
    missed defects below every good part: the AUROC drop refuses it (a classifier's gate
    is unchanged)."""
    from lineside.export.bundle import _refusal_reasons
    from lineside.export.quantize import int8_gate

    y = np.array([0] * 10 + [1] * 10)
    good = np.linspace(0.1, 0.4, 10)
    fp32_bad = np.r_[np.linspace(0.6, 0.9, 8), 0.45, 0.48]        # two defects missed, ranked above every good part
    int8_bad = np.r_[np.linspace(0.6, 0.9, 8), 0.05, 0.06]        # still missed, now below every good part
    p32 = np.stack([1 - np.r_[good, fp32_bad], np.r_[good, fp32_bad]], 1)
    p8 = np.stack([1 - np.r_[good, int8_bad], np.r_[good, int8_bad]], 1)
    labels = ["good", "anomalous"]
    plain = int8_gate(y, p32, p8, labels, 0.3, min_agreement=99.5)
    assert plain["passed"] and plain["top1_agreement"] == 1.0 and "int8_auroc" not in plain
    gate = int8_gate(y, p32, p8, labels, 0.3, min_agreement=99.5, ranking=True)
    assert gate["fp32_auroc"] == 100.0 and gate["int8_auroc"] == pytest.approx(80.0)
    assert not gate["passed"] and not gate["auroc_passed"]
    reasons = _refusal_reasons(gate, (0.3, 99.5), estimated=False)
    assert len(reasons) == 1 and "AUROC of 80.00" in reasons[0]
    assert int8_gate(y, p32, p32, labels, 0.3, min_agreement=99.5, ranking=True)["passed"]
