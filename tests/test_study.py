"""Studies: draws, the learning-curve fit, the paired comparison, cross-validation."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from lineside.cli import main
from lineside.dataset import draw_per_class
from lineside.errors import LinesideError
from lineside.learning_curve import estimate_size, extrapolation_check, fit_power_law
from lineside.train.config import TrainConfig
from lineside.train.calibrate import stratified_folds
from lineside.train.study import compare

from conftest import TINY


def test_draws_are_disjoint_stratified_and_seeded():
    targets = np.repeat(np.arange(4), [30, 12, 20, 9])
    for k in (1, 5, 8):
        for seed in range(3):
            drawn, rest = draw_per_class(targets, k, seed)
            assert not set(drawn) & set(rest) and len(drawn) + len(rest) == len(targets)
            assert np.bincount(targets[drawn]).tolist() == [k] * 4          # every class, k each
            assert set(np.unique(targets[rest])) == {0, 1, 2, 3}             # every class left to score
            assert np.array_equal(drawn, draw_per_class(targets, k, seed)[0])
    assert not np.array_equal(draw_per_class(targets, 5, 0)[0], draw_per_class(targets, 5, 1)[0])


def test_folds_cover_every_image_once_and_keep_class_balance():
    targets = np.repeat(np.arange(3), [23, 11, 17])
    fold, k = stratified_folds(targets, 0, max_folds=5, min_folds=5)
    folds = [np.flatnonzero(fold == f) for f in range(k)]
    assert k == 5
    every = np.concatenate(folds)
    assert sorted(every.tolist()) == list(range(len(targets)))
    for c, n in enumerate([23, 11, 17]):
        per_fold = [int((targets[f] == c).sum()) for f in folds]
        assert max(per_fold) - min(per_fold) <= 1 and sum(per_fold) == n
    assert max(map(len, folds)) - min(map(len, folds)) <= 3         # at most one more per class


def test_power_law_fit_recovers_known_curve():
    n = np.array([1, 2, 5, 10, 20, 50])
    truth = 0.97 - 0.25 * n ** -0.6
    law = fit_power_law(n, truth)
    assert abs(law.a - 0.97) < 2e-3 and abs(law.b - 0.25) < 5e-3 and abs(law.c - 0.6) < 0.02
    assert abs(law.size_for(0.95) - (0.25 / 0.02) ** (1 / 0.6)) < 1.5
    # fitted on the small sizes only, it predicts the large ones
    check = extrapolation_check(n, {k: [v] for k, v in zip(n, truth)})
    assert check["fit_sizes"] == [1, 2, 5, 10] and check["max_abs_error_points"] < 0.1


def test_estimate_says_when_the_target_is_out_of_reach():
    rng = np.random.default_rng(0)
    n = [1, 2, 5, 10, 20]
    scores = {k: list(0.90 - 0.3 * k ** -0.8 + rng.normal(0, 0.003, 4)) for k in n}
    est = estimate_size(n, scores, target=0.99, boots=100)
    assert est["estimate"] is None and "levels off" in est["statement"]
    reachable = estimate_size(n, scores, target=0.88, boots=100)
    assert 20 < reachable["estimate"] < 45 and "about" in reachable["statement"]
    reached = estimate_size(n, scores, target=0.84, boots=100)
    assert reached["estimate"] == 10 and reached["statement"].startswith("reached")
    assert estimate_size([1, 2], {1: [0.5], 2: [0.6]}, 0.9)["estimate"] is None   # too few sizes
    # far beyond the sizes measured: a plain "more than", never a number of 18 digits
    slow = {k: list(0.999 - 0.5 * k ** -0.05 + rng.normal(0, 0.001, 4)) for k in n}
    far = estimate_size(n, slow, target=0.95, boots=50)
    assert far["estimate"] > 10 * max(n) and far["statement"].startswith("more than 200 images per class")
    assert str(int(far["estimate"])) not in far["statement"]


def test_default_sizes_that_a_pilot_set_cannot_hold_are_left_out():
    from lineside.errors import LinesideError
    from lineside.train.study import DEFAULT_SHOTS, StudyData, _check_shots

    d = StudyData(None, np.zeros((0, 1, 1, 3), np.uint8), np.repeat(np.arange(3), 12), ["a", "b", "c"], None, [])
    assert _check_shots(d, DEFAULT_SHOTS, drop_too_big=True) == [1, 2, 5, 10]
    with pytest.raises(LinesideError, match="--shots: 20, 50"):
        _check_shots(d, DEFAULT_SHOTS)


def test_sample_size_study_end_to_end(synth_dir, tmp_path):
    out = tmp_path / "ss"
    res = CliRunner().invoke(main, ["study", "sample-size", str(synth_dir), "--shots", "1,2,4,6", "--repeats", "2",
                                    "--strategy", "linear", "--target", "0.9", "--image-size", "64",
                                    "--views", "2", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert [s["shots"] for s in r["sizes"]] == [1, 2, 4, 6] and len(r["runs"]) == 8
    for row in r["runs"]:
        assert row["n_train"] == 5 * row["shots"] and row["n_eval"] == 60 - 5 * row["shots"]
    assert r["sizes"][-1]["mean"] > 0.5                 # the features carry the classes
    assert set(r["per_class"]) == {"card", "cube", "hat", "screw", "torch"}
    assert {"estimate", "statement"} <= set(r["estimate"])
    assert (out / "learning_curve.png").stat().st_size > 10_000 and "How many images" in (out / "report.md").read_text()
    res = CliRunner().invoke(main, ["study", "sample-size", str(synth_dir), "--shots", "1,12", "--out", str(out)])
    assert res.exit_code == 2 and "12" in res.output


def test_compare_is_paired(synth_dir, tmp_path):
    cfg = TrainConfig(**TINY)
    r = compare(synth_dir, tmp_path / "cmp", cfg, strategies=("linear", "finetune"), shots=4, repeats=2, views=2,
                progress=False)
    for seed in range(2):
        draws = {row["draw"] for row in r["runs"] if row["seed"] == seed}
        assert len(draws) == 1                          # every strategy trained on the same images
    assert {row["draw"] for row in r["runs"] if row["seed"] == 0} != {row["draw"] for row in r["runs"] if row["seed"] == 1}
    assert r["summary"][r["best"]]["vs_best_points"] == 0.0
    assert (tmp_path / "cmp" / "compare.png").is_file() and (tmp_path / "cmp" / "compare.json").is_file()


def test_cross_validation_scores_every_image_once(synth_dir, tmp_path):
    res = CliRunner().invoke(main, ["study", "cv", str(synth_dir), "--folds", "3", "--strategy", "linear",
                                    "--image-size", "64", "--views", "2", "--out", str(tmp_path / "cv"), "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert r["pooled"]["n"] == 60 and sum(f["n_eval"] for f in r["per_fold"]) == 60
    cm = np.array(r["pooled"]["confusion_matrix"])
    assert len(r["misclassified"]) == cm.sum() - np.trace(cm)
    assert (tmp_path / "cv" / "confusion_matrix.png").is_file()


@pytest.mark.parametrize("args, message", [(["--folds", "99"], "--folds"), (["--folds", "1"], "--folds")])
def test_cv_rejects_bad_folds(synth_dir, tmp_path, args, message):
    res = CliRunner().invoke(main, ["study", "cv", str(synth_dir), "--strategy", "linear", "--image-size", "64",
                                    "--out", str(tmp_path / "cv"), *args])
    assert res.exit_code == 2 and message in res.output


def test_shared_frozen_layers_predict_like_the_whole_network(synth_dir):
    from lineside.train.study import Study
    from lineside.train.trainer import Trainer

    cfg = TrainConfig(strategy="finetune", **TINY)
    study = Study(synth_dir, cfg, views=1, progress=False)
    d = study.data
    drawn, rest = draw_per_class(d.y, 4, 0)
    trainer = Trainer(cfg, d.classes, d.spec, progress=False)
    plan = trainer.fit(d.x[drawn], d.y[drawn]).plan
    assert plan.frozen > 0
    shared = study._predict_from_trunk(trainer, plan.frozen, rest)
    whole = trainer.predict_proba(d.x[rest])
    assert np.abs(shared - whole).max() < 1e-2 and (shared.argmax(1) == whole.argmax(1)).mean() > 0.95


def test_a_study_of_auto_measures_what_lineside_train_would_choose(synth_dir, monkeypatch):
    """auto in a study is auto as in `lineside train`: when the middle stages win the
    cross-validation, the row is a linear head on them, scored through the whole model."""
    from lineside.train import auto
    from lineside.train.study import Study

    real = auto.pooled_stage_features

    def last_stage_is_noise(model, x, device, **kw):
        feats = real(model, x, device, **kw)
        feats[-1] = np.random.default_rng(0).normal(0, 1, feats[-1].shape).astype(np.float32)
        return feats

    monkeypatch.setattr(auto, "pooled_stage_features", last_stage_is_noise)
    study = Study(synth_dir, TrainConfig(**TINY), views=1, progress=False)
    drawn, rest = draw_per_class(study.data.y, 6, 0)
    row = study.run_one("auto", drawn, rest, 0)
    assert row["strategy"] == "linear" and row["requested"] == "auto" and "stages" in row["note"]
    assert row["balanced_accuracy"] >= 0.5 and len(row["_pred"]) == len(rest)


def test_an_interrupted_sample_size_study_keeps_its_fits_and_carries_on(synth_dir, tmp_path, monkeypatch):
    """Ctrl-C in the middle: one line, the finished fits kept in fits.jsonl; the same
    command then fits only the rest and reports every fit, as one uninterrupted run does."""
    from lineside.train import study as S

    cfg = TrainConfig(strategy="linear", image_size=64)
    real, calls = S.Study.run_one, []

    def run_one(self, *a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(S.Study, "run_one", run_one)
    out = tmp_path / "ss"
    with pytest.raises(LinesideError, match=r"interrupted: 3 of 6 fits are saved in .*fits.jsonl"):
        S.sample_size(synth_dir, out, cfg, shots=(1, 2, 4), repeats=2, views=2, progress=False)
    assert len((out / "fits.jsonl").read_text().splitlines()) == 3
    calls.clear()
    monkeypatch.setattr(S.Study, "run_one", real)
    resumed = S.sample_size(synth_dir, out, cfg, shots=(1, 2, 4), repeats=2, views=2, progress=False)
    whole = S.sample_size(synth_dir, tmp_path / "whole", cfg, shots=(1, 2, 4), repeats=2, views=2, progress=False)
    strip = [{k: v for k, v in r.items() if k != "train_s" and k != "note"} for r in resumed["runs"]]
    assert strip == [{k: v for k, v in r.items() if k != "train_s" and k != "note"} for r in whole["runs"]]
    assert [s["mean"] for s in resumed["sizes"]] == [s["mean"] for s in whole["sizes"]]
    # another study (other options) in the same folder takes none of them up
    other = S.sample_size(synth_dir, out, cfg.override(seed=1), shots=(1, 2), repeats=1, views=2, progress=False)
    assert len(other["runs"]) == 2 and len((out / "fits.jsonl").read_text().splitlines()) == 8
