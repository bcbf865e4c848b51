"""Confidence that means a probability: a temperature fitted on held-out predictions and
folded into the head, and the default --reject-below chosen from the same predictions."""

import json

import numpy as np
import pytest
import torch

from conftest import TINY
from lineside.train.calibrate import (calibration_report, expected_calibration_error, fit_temperature,
                                      reject_threshold, softmax, stratified_folds)
from lineside.train.config import TrainConfig


def _calibrated_logits(n: int, classes: int, seed: int):
    """Logits whose softmax is calibrated by construction: labels drawn from it."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.5, (n, classes))
    p = softmax(z)
    y = np.array([rng.choice(classes, p=row) for row in p])
    return z, y


def test_the_temperature_undoes_a_known_overconfidence_and_the_ece_shows_it():
    z, y = _calibrated_logits(4000, 3, 0)
    assert expected_calibration_error(softmax(z), y) < 0.03
    overconfident = z * 3.0          # what an overfitted model says
    assert expected_calibration_error(softmax(overconfident), y) > 0.1
    assert fit_temperature(overconfident, y) == pytest.approx(3.0, rel=0.1)
    r = calibration_report(overconfident, y, "test")
    assert r["ece_after"] < 0.03 < r["ece_before"] and r["nll_after"] < r["nll_before"]
    assert fit_temperature(z / 2.0, y) == pytest.approx(0.5, rel=0.1)     # and an underconfident one


def test_when_every_held_out_answer_is_right_the_temperature_does_not_run_to_zero():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 40)
    z = rng.normal(0, 1, (40, 3))
    z[np.arange(40), y] += 4
    r = calibration_report(z, y, "test")
    mean_conf = softmax(z / r["temperature"]).max(1).mean()
    assert mean_conf <= 41 / 42 + 1e-6      # no surer than (right + 1) / (n + 2)
    assert r["reject_below"] < 0.99
    # the report says so: the ECE it shows afterwards is that ceiling's doing, not a bad fit
    assert r["right"] == 40 and r["confidence_ceiling"] == pytest.approx(41 / 42, abs=1e-4)
    overconfident, y = _calibrated_logits(4000, 3, 0)
    r = calibration_report(overconfident * 3.0, y, "test")      # a fit that needs no ceiling
    assert r["confidence_ceiling"] is None and r["right"] == int(np.sum(overconfident.argmax(1) == y))


def test_the_reject_threshold_keeps_99_percent_of_the_right_answers():
    z, y = _calibrated_logits(3000, 4, 2)
    p = softmax(z)
    t = reject_threshold(p, y)
    right = p.argmax(1) == y
    kept = np.mean(p.max(1)[right] >= t)
    assert 0.985 <= kept <= 1.0
    assert np.mean(p.max(1)[~right] < t) > 0.03      # and it turns more wrong answers into unknown
    assert reject_threshold(p, (p.argmax(1) + 1) % 4) is None


def test_folds_spread_every_class():
    y = np.repeat([0, 1, 2], [5, 7, 3])
    fold, k = stratified_folds(y, 0)
    assert k == 3
    for c in range(3):
        assert sorted(set(fold[y == c])) == [0, 1, 2]
    assert stratified_folds(np.array([0, 0, 1]), 0)[1] == 0


def test_a_default_run_is_calibrated_out_of_fold_and_the_bundle_carries_its_reject_threshold(synth_dir, tmp_path):
    from lineside.export.bundle import export_bundle
    from lineside.runtime.model import open_model
    from lineside.train.checkpoint import load_checkpoint
    from lineside.train.run import train_run

    cfg = TrainConfig(strategy="linear", **dict(TINY, calibrate="auto"))
    m = train_run(synth_dir, tmp_path / "run", cfg, progress=False)
    c = m["calibration"]
    assert c["source"].startswith("out-of-fold predictions of the 60 training images (5 folds)")
    assert c["temperature"] > 0 and 0 <= c["ece_after"] <= 1 and 0 < c["reject_below"] <= 1
    assert (tmp_path / "run" / "calibration.png").stat().st_size > 5000
    assert load_checkpoint(tmp_path / "run").trained.reject_below == c["reject_below"]
    assert (tmp_path / "run" / "out_of_fold.npz").is_file()
    # its confusion matrix is of those out-of-fold answers, not of the images it trained on
    assert m["confusion_matrix_of"].startswith("out of fold (60 training images")
    res = export_bundle(tmp_path / "run", tmp_path / "b", formats=["openvino"])
    assert open_model(tmp_path / "b", backend="openvino").metadata.reject_below == c["reject_below"]
    # a linear head's INT8 gets a head of its own, divided by the run's temperature, and is
    # judged out of fold (tests/test_refit.py)
    q = res["report"]["int8"]["openvino"]
    assert q["judged"]["out_of_fold"] is True and "out-of-fold predictions" in q["eval_images"]
    assert q["gate"]["refit"]["temperature"] == c["temperature"]
    assert q["gate"]["passed"] == (q["gate"]["drop_points"] <= 0.3 and q["gate"]["top1_agreement"] >= 0.985
                                   and q["gate"]["refit"]["written_top1_agreement"] >= 0.995)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["calibration"] == c


def test_the_temperature_is_folded_into_the_head_and_changes_no_label(synth_dir, synth_test_dir):
    from lineside.dataset import load_arrays, load_image_set
    from lineside.train.backbones import BACKBONES
    from lineside.train.trainer import Trainer, score

    cfg = TrainConfig(strategy="linear", **TINY)
    train = load_image_set(synth_dir)
    trainer = Trainer(cfg, train.classes, BACKBONES.get(cfg.backbone).input_spec.with_size(64), progress=False)
    x, train, _ = load_arrays(train, trainer.spec, progress=False)
    y = np.asarray(train.targets)
    plan = trainer.fit(x, y).plan
    x_val, val, _ = load_arrays(load_image_set(synth_test_dir), trainer.spec, progress=False)
    before = score(trainer.model, x_val, logits=True)
    report = trainer.calibrate(x, y, plan, x_val, np.asarray(val.targets))
    assert report["source"] == f"the {len(x_val)} validation images"
    after = score(trainer.model, x_val, logits=True)
    assert np.allclose(after, before / report["temperature"], atol=1e-4)
    assert (after.argmax(1) == before.argmax(1)).all()
    assert isinstance(trainer.model.head, torch.nn.Linear)


def _linear_head_on_views(synth_dir):
    """A linear head on the middle stages, fitted on the synthetic images with eight exact
    views: (config, trainer, image set, images, labels)."""
    from lineside.dataset import load_arrays, load_image_set
    from lineside.train.backbones import BACKBONES
    from lineside.train.trainer import Trainer

    cfg = TrainConfig(strategy="linear", **dict(TINY, views=8, taps="mid", calibrate="auto"))
    train = load_image_set(synth_dir)
    trainer = Trainer(cfg, train.classes, BACKBONES.get(cfg.backbone).input_spec.with_size(64), progress=False)
    x, train, _ = load_arrays(train, trainer.spec, progress=False)
    y = np.asarray(train.targets)
    trainer.fit(x, y)
    return cfg, trainer, train, x, y


def test_out_of_fold_logits_of_a_linear_head_from_the_runs_bank_match_a_training_per_fold(synth_dir):
    """A linear head's out-of-fold predictions come from the training run's own bank of
    pooled features (no pass through the network); they must be what training the recipe
    again on each fold's other images gives."""
    from lineside.train.trainer import Trainer, score

    cfg, trainer, train, x, y = _linear_head_on_views(synth_dir)
    plan = trainer.result.plan
    assert trainer.model.views == (0, 1, 2, 3)
    fold, k = stratified_folds(y, cfg.seed, 5)
    per_fold = np.zeros((len(y), len(train.classes)), np.float32)
    for f in range(k):
        t = Trainer(cfg, train.classes, trainer.spec, progress=False)
        t.fit(x[fold != f], y[fold != f])
        per_fold[fold == f] = score(t.model, x[fold == f], logits=True)
    assert trainer.result.linear_bank is not None      # kept in the result for calibration
    report = trainer.calibrate(x, y, plan)
    assert report["source"] == "out-of-fold predictions of the 60 training images (5 folds)"
    from_bank = report["_logits"] * report["temperature"]
    assert np.abs(from_bank - per_fold).max() < 1e-3 * np.abs(per_fold).max()
    assert trainer.result.linear_bank is None          # the bank is freed once used


def test_self_trained_calibration_folds_learn_only_from_their_own_images(synth_dir):
    """With --unlabelled's self-training, each calibration fold self-trains from a head fitted on
    the other folds' rows alone: rows pseudo-labelled by the whole-data head would carry labels
    the held-out images helped choose (on elpv that made the classifier look 95% right out of
    fold, 80% in an honest cross-validation)."""
    from lineside.train.trainer import out_of_fold_on_bank

    cfg, trainer, train, x, y = _linear_head_on_views(synth_dir)
    bank, bank_y, n = trainer.result.linear_bank[:3]
    calls = []

    def refit(rows, labels):
        head = torch.nn.Linear(rows.shape[1], len(train.classes))
        calls.append((rows.cpu().clone(), labels.copy(), head))
        return head

    fold, k = stratified_folds(y, cfg.seed, 5)
    logits = out_of_fold_on_bank(trainer.run, trainer.model, (bank, bank_y, n, refit), fold, k)
    assert len(calls) == k
    tiled = np.tile(np.arange(n), len(bank) // n)
    for f, (rows, labels, head) in enumerate(calls):
        keep = np.flatnonzero(fold[tiled] != f)
        assert torch.equal(rows, bank[keep].float()) and (labels == bank_y[keep]).all()
        held = np.flatnonzero(fold == f)
        views = [r * n + held for r in range(len(trainer.model.views))]
        with torch.no_grad():
            expected = head(torch.stack([bank[torch.from_numpy(v)] for v in views]).float().mean(0)).numpy()
        assert np.allclose(logits[held], expected, atol=1e-5)


def test_the_train_summary_says_when_the_temperature_was_raised_to_the_ceiling():
    """An expected calibration error that grows after calibration (0.001 -> 0.024 on 40 of 40
    right) reads as a bad fit unless the line says the ceiling raised it."""
    from lineside.commands.train import calibration_line

    c = {"source": "the 40 validation images", "images": 40, "right": 40, "temperature": 1.73,
         "confidence_ceiling": 41 / 42, "ece_before": 0.001, "ece_after": 0.024, "reject_below": 0.88}
    line = calibration_line(c)
    assert "temperature 1.73 (raised: 40 of 40 right answers vouch for a mean confidence of at most 97.6%)" in line
    assert line.endswith("0.001 -> 0.024; default --reject-below 0.88 (keeps 99% of the right answers)")
    assert "raised" not in calibration_line(dict(c, confidence_ceiling=None))



def test_ctrl_c_during_out_of_fold_calibration_ends_the_run_and_says_so(synth_dir, tmp_path, monkeypatch):
    """Ctrl-C while a fold of the out-of-fold calibration trains (most of a fine-tuning
    run's time with few images): the run stops there, keeps its trained model
    uncalibrated, and metrics.json says "interrupted": true (it said false)."""
    from lineside.train import loop
    from lineside.train.config import TrainConfig
    from lineside.train.run import train_run

    real, calls = loop.train_one_epoch, []

    def one_epoch(*a, **k):
        calls.append(1)
        if len(calls) == 2:          # the first fold's training: the main training ran its one epoch
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop, "train_one_epoch", one_epoch)
    cfg = TrainConfig(strategy="finetune", epochs=1, image_size=64, batch_size=8, views=2)
    m = train_run(synth_dir, tmp_path / "run", cfg, progress=False)
    assert m["interrupted"] is True and m["calibration"] is None
    assert len(calls) == 2                       # no fold trained after the Ctrl-C
    assert (tmp_path / "run" / "model.pt").is_file()
