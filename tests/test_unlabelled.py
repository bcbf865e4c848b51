"""Learning from unlabelled images (lineside train --unlabelled) and choosing which to label
next (lineside study next), on tiny synthetic plates: good ones and dented ones."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from test_anomaly import SIZE, _write

from lineside.errors import LinesideError


@pytest.fixture(scope="module")
def plates(tmp_path_factory):
    """Labelled plates (12 good, 12 dented) and a folder of unlabelled ones (mostly good, in
    a sub-folder as a run's saved frames are, with one file that is not an image)."""
    root = tmp_path_factory.mktemp("unlabelled")
    labelled = _write(root / "labelled", 12, 12, 0)
    frames = _write(root / "frames" / "shift1", 40, 8, 5)
    (frames / "good" / "broken.png").write_bytes(b"not a png")
    return labelled, root / "frames"


def _train(plates, out, **kw):
    from lineside.train.config import TrainConfig
    from lineside.train.run import train_run

    cfg = TrainConfig(strategy="linear", image_size=SIZE, seed=0, device="cpu")
    return train_run(plates[0], out, cfg, progress=False, unlabelled=plates[1], **kw)


@pytest.fixture(scope="module")
def unlabelled_run(plates, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return out, _train(plates, out)


def test_every_readable_image_is_used_and_each_step_says_why(unlabelled_run):
    m = unlabelled_run[1]["unlabelled"]
    assert m["found"] == 49 and m["used"] == 48 and m["unreadable"] == 1
    steps = {s["method"]: s for s in m["steps"]}
    assert list(steps) == ["self-training", "good parts"]
    st = steps["self-training"]
    assert st["used"] == (st["cv_with_unlabelled"] >= st["cv_labelled_only"])
    assert st["why"] and f"{st['cv_labelled_only']:.1%}" in st["why"]
    if st["used"]:     # the same number of images for every class, however unbalanced the folder
        assert st["pseudo_labelled"] > 0 and st["pseudo_labelled"] % 2 == 0
    gp = steps["good parts"]
    assert gp["good_class"] == "good" and gp["unlabelled_called_good"] >= 8
    assert gp["used"] == (gp["cv_with_good_parts"] >= gp["cv_classifier_alone"])


def test_the_good_parts_layer_is_kept_only_when_cross_validation_prefers_it(plates, tmp_path, monkeypatch):
    import lineside.train.unlabelled as U
    from lineside.train.checkpoint import load_checkpoint

    monkeypatch.setattr(U, "stack_out_of_fold", lambda inputs, y, classes, seed, *a, **k: np.eye(classes)[1 - y] * 5.0)
    m = _train(plates, tmp_path / "worse")
    gp = m["unlabelled"]["steps"][1]
    assert gp["used"] is False and "not used" in gp["why"]
    assert not hasattr(load_checkpoint(tmp_path / "worse").model, "scorer")


@pytest.fixture(scope="module", params=["split", "stack"])
def good_parts_run(plates, tmp_path_factory, request):
    """A run whose good-parts layer is kept, in each of its two forms: its cross-validation
    made to favour it and offered only that form, so that the model it writes is the
    combined one whatever these tiny plates would decide."""
    import lineside.train.unlabelled as U

    out = tmp_path_factory.mktemp("good_parts")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(U, "keeps_good_parts", lambda alone, with_good: True)
        mp.setattr(U, "LAYER_FORMS", (request.param == "split",))
        metrics = _train(plates, out)
    return out, metrics, request.param


def test_the_combined_model_round_trips_and_exports_with_the_same_answers(good_parts_run, plates, tmp_path):
    from lineside.dataset import load_arrays, load_image_set
    from lineside.export.bundle import export_bundle
    from lineside.runtime.model import open_model
    from lineside.train.checkpoint import load_checkpoint
    from lineside.train.good_parts import GoodPartsClassifier
    from lineside.train.trainer import score

    out, metrics, form = good_parts_run
    gp = metrics["unlabelled"]["steps"][1]
    assert gp["used"] is True and metrics["calibration"]["source"].startswith("out-of-fold")
    assert gp["layer"] == form and list(k for k in gp if k.startswith("cv_")) == ["cv_classifier_alone", "cv_with_good_parts", f"cv_{form}"]
    loaded = load_checkpoint(out)
    assert isinstance(loaded.model, GoodPartsClassifier) and loaded.labels == ["dent", "good"]
    assert loaded.model.split == (form == "split")
    assert loaded.model.ok == 1 and loaded.model.scorer.bank.abs().sum() > 0
    # the anomaly model's default scorer: the bank and a Gaussian per position, both exported
    assert gp["scorer"] == loaded.model.scorer.scorer == "both" and loaded.model.scorer.whiten.abs().sum() > 0
    x, _, _ = load_arrays(load_image_set(plates[0]), loaded.spec, progress=False)
    ref = score(loaded.model, x, "cpu")
    # the distance to the good parts reaches the answer: it varies, and the layer weighs it
    with torch.no_grad():
        inputs = loaded.model.inputs(torch.from_numpy(x).permute(0, 3, 1, 2).float())
    assert float(inputs[:, -1].std()) > 0 and float(loaded.model.head.weight.detach()[:, -1].abs().max()) > 0
    if form == "split":     # the good class reads the distance alone; the defect nothing of the layer's own
        w = loaded.model.head.weight.detach()
        assert float(w[:, :-1].abs().max()) == 0 and float(w[0].abs().max()) == 0
    bundle = tmp_path / "bundle"
    result = export_bundle(out, bundle, int8=False)
    assert result["report"]["parity"]["passed"]
    for backend in ("onnxruntime", "openvino"):
        probs = open_model(bundle, backend=backend).predict_proba(x)
        np.testing.assert_allclose(probs, ref, atol=2e-3)
    if form == "split":
        _int8_keeps_the_distance_in_float(bundle, x, tmp_path)


def _int8_keeps_the_distance_in_float(bundle, x, tmp_path):
    """INT8 of a model with good parts: every operation the distance to them depends on
    stays in float (quantised, they moved every distance: docs/unlabelled.md); the
    classifier's convolutions are quantised; ONNX Runtime is told the same nodes."""
    import onnx
    import openvino as ov

    from lineside.export import quantize
    from lineside.runtime.model import open_model

    meta = open_model(bundle, backend="openvino").metadata.with_precision("int8")
    fp32 = ov.Core().read_model(str(bundle / "model_fp32.xml"))
    scorer = set(quantize.openvino_scorer(fp32))
    kinds = {op.get_friendly_name(): op.get_type_name() for op in fp32.get_ordered_ops()}
    assert {"Log", "Convolution"} <= {kinds[n] for n in scorer}
    assert sum(k == "Convolution" for k in kinds.values()) > sum(kinds[n] == "Convolution" for n in scorer)
    recipe = {**quantize.RECIPES[0][1], "float_scorer": True}
    int8 = ov.Core().read_model(str(quantize.quantize_openvino(bundle / "model_fp32.xml", tmp_path / "q.xml", x,
                                                               meta, recipe)))
    kinds8 = {op.get_friendly_name(): op.get_type_name() for op in int8.get_ordered_ops()}
    assert "FakeQuantize" not in {kinds8[n] for n in quantize.openvino_scorer(int8)}
    assert list(kinds8.values()).count("FakeQuantize") >= 5
    graph = onnx.load(str(bundle / "model_fp32.onnx"))
    in_onnx = set(quantize.onnx_scorer(graph))
    convs = [n.name for n in graph.graph.node if n.op_type == "Conv"]
    assert any(n.op_type == "Log" and n.name in in_onnx for n in graph.graph.node)
    assert 0 < sum(c in in_onnx for c in convs) < len(convs)


def test_the_split_form_asks_the_distance_whether_good_and_the_classifier_which_defect(tmp_path):
    from lineside.train.good_parts import layer_logits
    from lineside.train.unlabelled import fit_split

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)                          # class 1 is the good one
    distance = np.where(y == 1, 0.0, 2.0) + rng.normal(0, 0.5, 60)
    logits = rng.normal(0, 1, (60, 3)).astype(np.float32)
    inputs = np.concatenate([logits, distance[:, None]], 1).astype(np.float32)
    head = fit_split(inputs, y, 3, ok=1)
    with torch.no_grad():
        probs = torch.softmax(layer_logits(head, torch.from_numpy(inputs), True, 1), 1).numpy()
    a, b = float(head.weight.detach()[1, -1]), float(head.bias.detach()[1])
    assert a < 0                                          # farther from the good parts, less likely good
    np.testing.assert_allclose(probs[:, 1], 1 / (1 + np.exp(-(a * distance + b))), rtol=1e-4, atol=1e-6)
    between = np.exp(logits[:, [0, 2]]) / np.exp(logits[:, [0, 2]]).sum(1, keepdims=True)
    np.testing.assert_allclose(probs[:, [0, 2]] / probs[:, [0, 2]].sum(1, keepdims=True), between, rtol=1e-4)
    assert (probs.argmax(1) == 1).mean() > 0.3 and ((probs.argmax(1) == 1) == (y == 1)).mean() > 0.9
    # the same layer as the exporter writes it (slices, concatenation, log-sum-exp), run by ONNX Runtime
    import onnxruntime as ort

    from lineside.export.onnx_export import OPSET

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, v):
            return layer_logits(self.head, v, True, 1)

    path = tmp_path / "layer.onnx"
    torch.onnx.export(Layer().eval(), (torch.from_numpy(inputs[:2]),), str(path), dynamo=False, opset_version=OPSET,
                      input_names=["v"], output_names=["out"], dynamic_axes={"v": {0: "n"}, "out": {0: "n"}})
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"v": inputs})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, layer_logits(head, torch.from_numpy(inputs), True, 1).numpy(), atol=1e-4)


def test_the_layer_form_follows_cross_validation_and_a_tie_takes_the_split():
    from lineside.train.unlabelled import choose_layer

    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 20)
    sign = np.where(y == 1, 1.0, -1.0)
    # the classifier knows, the distance is noise: the stack
    inputs = np.stack([-sign * 3, sign * 3, rng.normal(0, 1, 40)], 1).astype(np.float32)
    split, forms, oof, score = choose_layer(inputs, y, 2, ok=1, seed=0)
    assert not split and forms["cv_stack"] > forms["cv_split"] and score == forms["cv_stack"] and oof.shape == (40, 2)
    # the distance knows, the classifier is noise: the split (the stack reads the distance too)
    inputs = np.stack([rng.normal(0, 1, 40), rng.normal(0, 1, 40), -sign * 3], 1).astype(np.float32)
    split, forms, _, _ = choose_layer(inputs, y, 2, ok=1, seed=0)
    assert split and forms["cv_split"] == 1.0 >= forms["cv_stack"]
    # both know: a tie, the split
    inputs = np.stack([-sign * 3, sign * 3, -sign * 3], 1).astype(np.float32)
    split, forms, _, _ = choose_layer(inputs, y, 2, ok=1, seed=0)
    assert split and forms["cv_split"] == forms["cv_stack"] == 1.0


def test_pseudo_labels_are_balanced_and_surest_first():
    from lineside.train.unlabelled import balanced_pseudo_labels

    probs = np.array([[0.9, 0.1], [0.99, 0.01], [0.6, 0.4], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
    rows, labels = balanced_pseudo_labels(probs, cap=5)
    # four images called the first class, two the second: two of each, the surest first
    assert rows.tolist() == [1, 0, 4, 5] and labels.tolist() == [0, 0, 1, 1]
    rows, labels = balanced_pseudo_labels(probs, cap=1)
    assert rows.tolist() == [1, 4] and labels.tolist() == [0, 1]
    rows, _ = balanced_pseudo_labels(np.array([[0.9, 0.1], [0.8, 0.2]]), cap=5)
    assert len(rows) == 0          # no image called the second class: none of either


def test_picks_spread_over_what_the_images_show():
    from lineside.train.next import margins, spread_picks

    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.01, (20, 8)) + np.eye(8)[0]
    b = rng.normal(0, 0.01, (20, 8)) + np.eye(8)[1]
    feats = np.concatenate([a, b])
    uncertain = np.full(40, 0.5)
    first_two = spread_picks(feats, uncertain, np.zeros((0, 8)), 2)
    assert {i < 20 for i in first_two} == {True, False}          # one from each group, not two alike
    assert spread_picks(feats, uncertain, a[:1], 1)[0] >= 20      # the labelled images' group comes last
    np.testing.assert_allclose(margins(np.array([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05]])), [0.2, 0.85])


def test_study_next_queues_images_for_the_review_page_in_rank_order(unlabelled_run, plates, tmp_path):
    from lineside.cli import main
    from lineside.dataset import load_image_set
    from lineside.runtime.review import ReviewStore

    out = tmp_path / "next"
    r = CliRunner().invoke(main, ["study", "next", str(unlabelled_run[0]), str(plates[1]), "--count", "6",
                                  "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["queued"] == 6 and [q["rank"] for q in report["queue"]] == [1, 2, 3, 4, 5, 6]
    margins = [q["margin"] for q in report["queue"]]
    assert max(margins) <= 1.0 and len({q["path"] for q in report["queue"]}) == 6
    store = ReviewStore(out / "queue.sqlite", out / "frames")
    items = store.items()
    assert [i["capture"] for i in items] == ["study_next"] * 6
    rows = {i["id"]: i for i in items}
    assert [rows[i["id"]]["flags"][0] for i in items] == [f"rank {n}" for n in range(1, 7)]
    store.review(items[0]["id"], "dent")
    store.review(items[1]["id"], "good")
    reviewed = load_image_set(out / "frames" / "reviewed" / "manifest.csv")
    assert sorted(reviewed.classes) == ["dent", "good"] and len(reviewed) == 2
    again = CliRunner().invoke(main, ["study", "next", str(unlabelled_run[0]), str(plates[1]), "--out", str(out)])
    assert again.exit_code != 0 and "already there" in again.output


def test_wrong_uses_are_one_line_errors(plates, tmp_path):
    from lineside.cli import main
    from lineside.train.unlabelled import read_unlabelled

    runner = CliRunner()
    r = runner.invoke(main, ["train", str(plates[0]), "--out", str(tmp_path / "a"), "--ok-classes", "good"])
    assert r.exit_code != 0 and "--ok-classes" in r.output
    r = runner.invoke(main, ["train", str(plates[0]), "--out", str(tmp_path / "b"), "--task", "anomaly",
                             "--unlabelled", str(plates[1])])
    assert r.exit_code != 0 and "--unlabelled" in r.output
    (tmp_path / "empty").mkdir()
    r = runner.invoke(main, ["train", str(plates[0]), "--out", str(tmp_path / "c"), "--unlabelled",
                             str(tmp_path / "empty")])
    assert r.exit_code != 0 and "no image files" in r.output
    assert not (tmp_path / "c" / "model.pt").exists() and not (tmp_path / "c" / "config.yaml").exists()  # said first
    with pytest.raises(LinesideError, match="no image files"):
        read_unlabelled(tmp_path / "empty", None, 0, False)
    with pytest.raises(LinesideError, match="not a folder"):
        read_unlabelled(tmp_path / "missing", None, 0, False)


def test_the_good_class_is_found_by_its_usual_names_whatever_their_case_or_punctuation():
    from lineside.train.anomaly_run import ok_classes_of
    from lineside.train.unlabelled import good_class

    assert ok_classes_of(["crack", "Good"], None) == ("Good",)
    assert ok_classes_of(["NG", "OK"], None) == ("OK",)
    assert ok_classes_of(["defect", "no_defect"], None) == ("no_defect",)
    assert ok_classes_of(["Defective", "Non-Defective"], None) == ("Non-Defective",)
    assert ok_classes_of(["normal", "good", "scratch"], None) == ("good",)      # the first name of the list wins
    assert good_class(["pass", "fail"], None) == 0 and good_class(["crack", "scratch"], None) is None
    assert good_class(["crack", "scratch"], "scratch") == 1
    with pytest.raises(LinesideError, match="--ok-classes"):
        ok_classes_of(["crack", "scratch"], None)
