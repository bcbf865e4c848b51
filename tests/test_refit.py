"""INT8 of a linear head: the head fitted again on the INT8 network's own features, judged
out of fold against heads fitted the same way on FP32 features."""

import shutil

import numpy as np
import pytest

from lineside.export import bundle as bundle_mod
from lineside.export.bundle import export_bundle


@pytest.fixture(scope="module")
def linear_run(synth_dir, tmp_path_factory):
    """A head on frozen features trained on every image (no validation split)."""
    from lineside.train.config import TrainConfig
    from lineside.train.run import train_run

    from conftest import TINY

    out = tmp_path_factory.mktemp("linear")
    train_run(synth_dir, out, TrainConfig(strategy="linear", val_fraction=0.0, **TINY), progress=False)
    return out


@pytest.fixture(scope="module")
def fp32_linear(linear_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32")
    export_bundle(linear_run, out, int8=False)
    return out


def test_the_tail_is_everything_after_the_last_convolution(fp32_linear):
    import onnx
    import openvino as ov

    from lineside.export.quantize import openvino_tail, tail_nodes

    model = onnx.load(str(fp32_linear / "model_fp32.onnx"))
    kinds = {n.name: n.op_type for n in model.graph.node}
    tail = tail_nodes(model)
    assert {"Gemm", "Softmax", "GlobalAveragePool"} <= {kinds[n] for n in tail}
    assert "Conv" not in {kinds[n] for n in tail}
    # nothing in the tail feeds a convolution; the node just before it (the last Conv's Add or Clip) is not in it
    produced = {o for n in model.graph.node if n.name in tail for o in n.output}
    assert not [n for n in model.graph.node if n.op_type == "Conv" and set(n.input) & produced]
    ir = ov.Core().read_model(str(fp32_linear / "model_fp32.xml"))
    types = {op.get_friendly_name(): op.get_type_name() for op in ir.get_ordered_ops()}
    ov_tail = openvino_tail(ir)
    assert {"MatMul", "Softmax"} <= {types[n] for n in ov_tail}
    assert not {"Convolution", "GroupConvolution"} & {types[n] for n in ov_tail}


@pytest.mark.parametrize("runtime,name", [("onnxruntime", "model_fp32.onnx"), ("openvino", "model_fp32.xml")])
def test_a_written_head_is_the_head_the_graph_applies(fp32_linear, synth_test_dir, tmp_path, runtime, name):
    from lineside.dataset import load_arrays, load_image_set
    from lineside.export.refit import FeatureGraph, Head, softmax, write_head
    from lineside.runtime.model import open_model

    for f in fp32_linear.glob("model_fp32.*"):
        shutil.copy(f, tmp_path / f.name)
    path = tmp_path / name
    x, _, _ = load_arrays(load_image_set(synth_test_dir), open_model(path, backend=runtime).spec, progress=False)
    graph = FeatureGraph(path, runtime, "fp32")
    feats = graph.averaged(x[:8])
    head = Head.__new__(Head)
    rng = np.random.default_rng(0)
    head.weight = rng.normal(0, 0.05, (graph.both(x[:1])[0].shape[1], feats.shape[1]))
    head.bias = rng.normal(0, 1.0, head.weight.shape[0])
    write_head(path, runtime, head)
    p = FeatureGraph(path, runtime, "fp32", graph.features).proba(x[:8])
    np.testing.assert_allclose(p, softmax(head.logits(feats)), atol=1e-4)
    assert open_model(path, backend=runtime).labels == open_model(fp32_linear / name, backend=runtime).labels


def test_int8_of_a_linear_head_gets_its_own_head_judged_out_of_fold(linear_run, tmp_path):
    import onnx
    from onnx import numpy_helper as nh

    res = export_bundle(linear_run, tmp_path / "b", max_drop=100, min_agreement=0)
    for runtime, q in res["report"]["int8"].items():
        assert q["verdict"] == "kept", q
        assert q["judged"]["out_of_fold"] and "out-of-fold" in q["eval_images"]
        refit = q["gate"]["refit"]
        assert refit["written_top1_agreement"] >= 0.995
        assert refit["temperature"] > 0
        assert q["gate"]["n"] >= 900     # the training images and their augmented copies

    def head(path):
        model = onnx.load(str(path))
        gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
        return next(nh.to_array(i) for i in model.graph.initializer if i.name == gemm.input[1])

    w32, w8 = head(tmp_path / "b" / "model_fp32.onnx"), head(tmp_path / "b" / "model_int8.onnx")
    assert w32.shape == w8.shape and not np.allclose(w32, w8)
    assert np.corrcoef(w32.ravel(), w8.ravel())[0, 1] > 0.5      # the same head, fitted on slightly other features


def _noisy_copy(scale):
    """A stand-in for the quantizer: the FP32 ONNX model with the weights of every convolution
    after the first ten perturbed by `scale` times their spread (0: an exact copy)."""
    def quantize(src, dst, calib, meta, recipe):
        import onnx
        from onnx import numpy_helper as nh

        model = onnx.load(str(src))
        convs = [n for n in model.graph.node if n.op_type == "Conv"][10:]
        weights = {n.input[1] for n in convs}
        rng = np.random.default_rng(0)
        for init in model.graph.initializer:
            if init.name in weights and scale:
                w = nh.to_array(init)
                init.CopyFrom(nh.from_array((w + scale * w.std() * rng.standard_normal(w.shape)).astype(w.dtype),
                                            init.name))
        onnx.save(model, str(dst))
        return dst
    return quantize


@pytest.mark.parametrize("scale,kept", [(0.0, True), (3.0, False)])
def test_the_out_of_fold_gate_keeps_faithful_int8_and_refuses_int8_that_lost_the_features(
        linear_run, tmp_path, monkeypatch, scale, kept):
    real = bundle_mod._int8_targets

    def targets(files):
        out = real(files)
        for t in out:
            t["quantize"] = _noisy_copy(scale)
            t["run_int8"] = t["run_fp32"]
        return out

    monkeypatch.setattr(bundle_mod, "_int8_targets", targets)
    res = export_bundle(linear_run, tmp_path / "b", formats=["onnx"])
    q = res["report"]["int8"]["onnxruntime"]
    assert (q["verdict"] == "kept") is kept, q.get("why")
    if kept:
        assert q["gate"]["drop_points"] == pytest.approx(0.0, abs=1e-9) and q["gate"]["top1_agreement"] == 1.0
    else:
        assert q["gate"]["drop_points"] > 0.3 and not (tmp_path / "b" / "model_int8.onnx").exists()


def test_only_a_plain_linear_head_is_fitted_again(linear_run, tiny_run):
    from lineside.export.refit import head_recipe
    from lineside.runs import RunFolder
    from lineside.train.checkpoint import load_checkpoint
    from lineside.train.config import TrainConfig

    config = TrainConfig.from_yaml(RunFolder.at(linear_run) / "config.yaml")
    loaded = load_checkpoint(linear_run)
    recipe, _ = head_recipe(loaded, config, {})
    assert recipe is not None and recipe.standardise == bool(loaded.model.taps)
    assert recipe.mirrored == (config.augment.flip and not any(k >= 4 for k in loaded.model.views or ()))
    assert head_recipe(loaded, config, {"unlabelled": {"self_training": True}})[0] is None
    assert head_recipe(load_checkpoint(tiny_run[0]), config, {})[0] is None          # fine-tuned
