"""A classifier guarded by an anomaly model of its good class (lineside train --guard): a
kind of defect nobody photographed is caught, labelled 'anomalous', and the model exports
and runs like any classifier. Tiny synthetic plates: good, dented (labelled), scratched
(never shown)."""

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from test_anomaly import SIZE, _part, _write


def _scratched(n: int, seed: int) -> np.ndarray:
    """Good plates with a red streak across the part: a defect the classifier never saw."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = _part(rng, False)
        y = int(rng.integers(22, 42))
        cv2.line(img, (18, y), (46, y + int(rng.integers(-4, 5))), (40, 40, 230), 4)    # BGR red
        out.append(img[:, :, ::-1])   # RGB, as the models take it
    return np.stack(out)


@pytest.fixture(scope="module")
def guarded_run(tmp_path_factory):
    from lineside.train.config import TrainConfig
    from lineside.train.run import train_run

    root = tmp_path_factory.mktemp("guard")
    data = _write(root / "train", 24, 12, 0)
    cfg = TrainConfig(strategy="linear", image_size=SIZE, seed=0, device="cpu")
    return root / "run", train_run(data, root / "run", cfg, progress=False, guard=0.01)


def test_the_guard_adds_its_label_and_reports_its_threshold(guarded_run):
    out, m = guarded_run
    assert m["labels"] == ["dent", "good", "anomalous"]
    g = m["guard"]
    assert g["good_class"] == "good" and g["good_images"] == 24 and g["threshold"] > 0
    assert g["false_reject_target"] == 0.01 and g["training_images_flagged"]["good"] <= 2
    with np.load(out / "out_of_fold.npz") as d:      # what the INT8 gate judges: every label's column
        assert d["logits"].shape == (36, 3)
        np.testing.assert_allclose(np.exp(d["logits"]).sum(1), 1.0, atol=1e-4)


def test_a_part_that_differs_from_the_good_ones_is_ng_and_the_label_says_which_model(guarded_run):
    from lineside.train.anomaly import anomaly_scores
    from lineside.train.checkpoint import load_checkpoint
    from lineside.train.trainer import score

    model = load_checkpoint(guarded_run[0]).model
    rng = np.random.default_rng(7)
    good = np.stack([_part(rng, False)[:, :, ::-1] for _ in range(16)])
    new = _scratched(12, 8)
    alone = score(model.inner, new).argmax(1)
    guarded = score(model, new).argmax(1)
    assert np.sum(guarded != 1) >= np.sum(alone != 1)          # never fewer parts NG than the classifier alone
    assert np.sum(score(model, good).argmax(1) != 1) <= 2         # good parts stay good
    # the guard's scores separate the new defect from good parts; with its threshold between them,
    # every streaked plate is NG: 'dent' where the classifier said so, 'anomalous' where it said good
    s_new, s_good = anomaly_scores(model.guard, new), anomaly_scores(model.guard, good)
    assert s_new.min() > s_good.max()
    model.guard.threshold.fill_(float(s_new.min() + s_good.max()) / 2)
    labels = score(model, new).argmax(1)
    assert np.all(labels != 1) and np.all(labels[alone == 0] == 0)
    assert np.any(labels[alone == 1] == 2)    # (where the classifier was torn, its dent may outweigh the share moved)
    assert np.all(score(model, good).argmax(1) == score(model.inner, good).argmax(1))


def test_the_numpy_formula_is_the_graph_and_a_defect_stays_the_classifiers(guarded_run):
    from lineside.train.anomaly import anomaly_scores
    from lineside.train.checkpoint import load_checkpoint
    from lineside.train.guard import combine

    model = load_checkpoint(guarded_run[0]).model
    x = np.concatenate([_scratched(4, 3), np.stack([_part(np.random.default_rng(i), True)[:, :, ::-1]
                                                    for i in range(4)])])
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        graph, inner = model(t).numpy(), model.inner(t).numpy()
    ref = combine(inner, anomaly_scores(model.guard, x), float(model.guard.threshold), model.ok)
    np.testing.assert_allclose(np.exp(graph), np.exp(ref), atol=1e-5)
    # a dent the classifier sees stays a dent: the guard moves only the good class's share
    dents = np.exp(graph[4:])
    np.testing.assert_allclose(dents[:, 0], torch.softmax(torch.from_numpy(inner[4:]), 1)[:, 0].numpy(), atol=1e-5)


def test_the_guarded_model_exports_with_the_same_answers_on_both_runtimes(guarded_run, tmp_path):
    from lineside.export.bundle import export_bundle
    from lineside.runtime.model import open_model
    from lineside.train.checkpoint import load_checkpoint
    from lineside.train.trainer import score

    loaded = load_checkpoint(guarded_run[0])
    x = np.concatenate([_scratched(4, 5), np.stack([_part(np.random.default_rng(i), False)[:, :, ::-1]
                                                    for i in range(4)])])
    ref = score(loaded.model, x)
    result = export_bundle(guarded_run[0], tmp_path / "bundle", int8=False)
    assert result["report"]["parity"]["passed"]
    for backend in ("onnxruntime", "openvino"):
        m = open_model(tmp_path / "bundle", backend=backend)
        assert m.labels == ["dent", "good", "anomalous"]
        np.testing.assert_allclose(m.predict_proba(x), ref, atol=2e-3)


def test_guard_options_are_checked(tmp_path):
    from lineside.cli import main

    data = _write(tmp_path / "d", 6, 6, 0)
    (tmp_path / "nogood").mkdir()
    for c in ("a", "b"):
        (tmp_path / "nogood" / c).mkdir()
        for i in range(4):
            cv2.imwrite(str(tmp_path / "nogood" / c / f"{i}.png"), _part(np.random.default_rng(i), c == "b"))
    runner = CliRunner()
    r = runner.invoke(main, ["train", str(tmp_path / "nogood"), "--out", str(tmp_path / "r1"), "--guard"])
    assert r.exit_code != 0 and "--guard" in r.output and "--ok-classes" in r.output
    r = runner.invoke(main, ["train", str(data), "--out", str(tmp_path / "r2"), "--false-reject", "0.01"])
    assert r.exit_code != 0 and "--false-reject" in r.output
    r = runner.invoke(main, ["train", str(data), "--out", str(tmp_path / "r3"), "--task", "anomaly", "--guard"])
    assert r.exit_code != 0 and "--guard" in r.output


@pytest.mark.parametrize("entry", ["guard", "label"])
def test_a_tampered_guard_entry_is_a_one_line_error_naming_the_file(guarded_run, tmp_path, entry):
    from lineside.errors import LinesideError
    from lineside.train.checkpoint import load_checkpoint

    payload = torch.load(guarded_run[0] / "model.pt", weights_only=True)
    if entry == "guard":
        payload["guard"]["taps"] = "3,5"
    else:
        payload["guard"]["label"] = "other"
    bad = tmp_path / "model.pt"
    torch.save(payload, bad)
    with pytest.raises(LinesideError, match=str(bad)):
        load_checkpoint(bad)
