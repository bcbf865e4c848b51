"""Inspection from good parts alone (lineside train --task anomaly): training, the
threshold, the checkpoint, export with the scorer inside the graph, eval, predict and
the heatmaps, on tiny synthetic parts."""

import json
import math
import subprocess
import sys

import cv2
import numpy as np
import pytest

from lineside.errors import LinesideError

SIZE = 64


def _part(rng, defect: bool) -> np.ndarray:
    """A textured grey plate with a lighter square part in the middle; a defect is a dark
    disc on the part."""
    noise = cv2.GaussianBlur(rng.normal(0, 1, (SIZE, SIZE)).astype(np.float32), (0, 0), 3)
    img = 120 + 12 * noise / (noise.std() + 1e-6)
    img[16:48, 16:48] += 50
    img = np.repeat(img[:, :, None], 3, axis=2)
    if defect:
        c = tuple(int(v) for v in rng.integers(24, 40, 2))
        cv2.circle(img, c, 12, (20, 20, 20), -1)
    return np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8)


def _write(root, good: int, defective: int, seed: int):
    rng = np.random.default_rng(seed)
    for folder, n in (("good", good), ("dent", defective)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            cv2.imwrite(str(root / folder / f"{folder}_{i:03d}.png"), _part(rng, folder == "dent"))
    return root


@pytest.fixture(scope="module")
def plates(tmp_path_factory):
    root = tmp_path_factory.mktemp("plates")
    # 30 good plates: enough for a Gaussian per position beside the bank on this 8x8 grid
    return _write(root / "train", 30, 6, 0), _write(root / "test", 16, 8, 1)


@pytest.fixture(scope="module")
def anomaly_run(plates, tmp_path_factory):
    from lineside.train.anomaly_run import train_anomaly_run

    out = tmp_path_factory.mktemp("anomaly_run")
    # 5% false rejects: a threshold low enough that most of these faint defects are above it,
    # so that both verdicts reach the runtimes under test
    metrics = train_anomaly_run(plates[0], out, image_size=SIZE, bank=256, progress=False, device="cpu",
                                false_reject=0.05)
    return out, metrics


@pytest.fixture(scope="module")
def anomaly_bundle(anomaly_run, tmp_path_factory):
    from lineside.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("anomaly_bundle")
    return out, export_bundle(anomaly_run[0], out, int8=False)


def test_trains_on_good_images_only_and_reports_the_defects(anomaly_run):
    out, m = anomaly_run
    assert m["task"] == "anomaly" and m["ok_classes"] == ["good"]
    assert m["train_counts"] == {"good": 30} and m["other_counts"] == {"dent": 6}
    a = m["anomaly"]
    assert a["threshold"] > 0 and a["bank"] <= 256
    assert a["scorer"] == "both" and a["scorer_note"] is None and a["gaussian_neighbourhood"] == 3
    # the threshold never flags every good part: at most a few of the out-of-fold scores
    e = a["false_reject_expected"]
    assert e["out_of_fold_images"] == 30 and e["out_of_fold_above"] <= 4
    lo, hi = e["interval_90"]
    assert 0 <= lo <= a["false_reject_target"] <= hi <= 1
    d = m["defects"]
    assert d["images"] == 6 and d["auroc"] >= 90, d
    assert {p.name for p in out.iterdir()} >= {"model.pt", "metrics.json", "scores.png", "scores.npz"}
    assert json.loads((out / "metrics.json").read_text())["anomaly"]["threshold"] == a["threshold"]


def test_checkpoint_round_trip_scores_the_same(anomaly_run, plates):
    from lineside.dataset import load_arrays, load_image_set
    from lineside.train.anomaly import anomaly_scores
    from lineside.train.checkpoint import load_checkpoint

    loaded = load_checkpoint(anomaly_run[0])
    assert loaded.labels == ["good", "anomalous"] and loaded.model.task == "anomaly"
    x, _, _ = load_arrays(load_image_set(plates[1]), loaded.spec, progress=False)
    s1 = anomaly_scores(loaded.model, x)
    s2 = anomaly_scores(load_checkpoint(anomaly_run[0] / "model.pt").model, x)
    np.testing.assert_allclose(s1, s2, rtol=1e-6)
    # the logits put P(anomalous) above one half exactly when the score is above the threshold
    from lineside.train.trainer import predict_proba

    p = predict_proba(loaded.model, x)
    thr = float(loaded.model.threshold)
    assert np.array_equal(p[:, 1] > 0.5, s1 > thr)


def test_exported_scores_agree_with_pytorch_on_both_runtimes(anomaly_bundle, anomaly_run, plates):
    """The bug anomaly users report most: the exported model scoring unlike the trained one."""
    from lineside.dataset import load_arrays, load_image_set
    from lineside.runtime.model import open_model
    from lineside.train.anomaly import anomaly_scores
    from lineside.train.checkpoint import load_checkpoint

    bundle, result = anomaly_bundle
    assert result["report"]["parity"]["passed"]
    loaded = load_checkpoint(anomaly_run[0])
    x, _, _ = load_arrays(load_image_set(plates[1]), loaded.spec, progress=False)
    ref, ref_maps = anomaly_scores(loaded.model, x, maps=True)
    for backend in ("onnxruntime", "openvino"):
        m = open_model(bundle, backend=backend)
        assert m.metadata.task == "anomaly" and m.metadata.anomaly["ok_classes"] == ["good"]
        assert m.metadata.anomaly["threshold"] == pytest.approx(float(loaded.model.threshold), rel=1e-6)
        scores, maps = m.anomaly(x)
        np.testing.assert_allclose(scores, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))
        np.testing.assert_allclose(maps, ref_maps, rtol=1e-3, atol=1e-4 * float(np.abs(ref_maps).max()))
        verdicts = m.predict_proba(x)[:, 1] > 0.5
        assert np.array_equal(verdicts, ref > float(loaded.model.threshold)), backend


def test_eval_counts_every_other_folder_as_anomalous_and_draws_a_gallery(anomaly_bundle, plates, tmp_path):
    from lineside.commands.scorer import open_scorer
    from lineside.scoring import evaluate_anomaly

    _, _, spec, about = open_scorer(anomaly_bundle[0], "onnxruntime", "fp32", None, None)
    r = evaluate_anomaly(about["anomaly"], spec, plates[1], progress=False, out=tmp_path / "gallery")
    assert r["good_images"] == 16 and r["other_images"] == 8
    assert r["auroc"] >= 90
    flagged_good = r["per_class"]["good"]["flagged"]
    assert r["false_reject"] == pytest.approx(flagged_good / 16)
    assert r["detection"] == pytest.approx(r["per_class"]["dent"]["flagged"] / 8)
    files = r["out"]["files"]
    assert files[:2] == ["index.html", "report.json"]
    assert len(files) == 2 + len(r["worst_good"]) + len(r["missed"]) and len(files) > 2
    page = (tmp_path / "gallery" / "index.html").read_text()
    assert all(name in page for name in files[2:])
    for name in files[2:]:
        image = cv2.imread(str(tmp_path / "gallery" / name))
        assert image is not None and image.shape[:2] == (SIZE, SIZE)


def test_predict_writes_overlays_and_the_verdict_follows_the_threshold(anomaly_run, plates, tmp_path):
    from lineside.commands.scorer import open_scorer
    from lineside.scoring import predict_anomaly

    _, _, spec, about = open_scorer(anomaly_run[0], None, "fp32", "cpu", None)
    paths = sorted((plates[1] / "dent").iterdir())[:2] + sorted((plates[1] / "good").iterdir())[:2]
    results = predict_anomaly(about["anomaly"], spec, paths, tmp_path / "ov")
    for r in results:
        assert r["label"] == ("anomalous" if r["score"] > r["threshold"] else "good")
        assert r["relative"] == pytest.approx(r["score"] / r["threshold"])
        assert cv2.imread(r["overlay"]).shape == (SIZE, SIZE, 3)
    assert min(r["score"] for r in results[:2]) > max(r["score"] for r in results[2:])


def test_heatmap_outlines_what_is_above_the_threshold():
    from lineside.heatmap import overlay

    rgb = np.full((40, 60, 3), 128, np.uint8)
    amap = np.zeros((5, 6), np.float32)
    amap[2, 3] = 3.0
    out = overlay(rgb, amap)
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    hot = out[16:24, 30:36].astype(int)
    cold = out[0:6, 0:6].astype(int)
    assert hot[..., 2].mean() > cold[..., 2].mean() + 50   # red (BGR) where the map is high
    # a map of NaNs and infinities draws without raising
    assert overlay(rgb, np.full((3, 3), np.nan, np.float32)).shape == (40, 60, 3)


def test_cli_trains_anomaly_with_json_and_names_wrong_options(plates, tmp_path):
    from click.testing import CliRunner

    from lineside.cli import main

    runner = CliRunner()
    r = runner.invoke(main, ["train", str(plates[0]), "--out", str(tmp_path / "r"), "--task", "anomaly",
                             "--image-size", str(SIZE), "--bank", "64", "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["task"] == "anomaly"
    # the bank alone, saved and loaded with its shape: the checkpoint scores as the run did
    r = runner.invoke(main, ["train", str(plates[0]), "--out", str(tmp_path / "rb"), "--task", "anomaly",
                             "--image-size", str(SIZE), "--scorer", "bank", "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["anomaly"]["scorer"] == "bank" and "bank of" in m["strategy_reason"]
    from lineside.train.checkpoint import load_checkpoint

    loaded = load_checkpoint(tmp_path / "rb").model
    assert loaded.scorer == "bank" and not hasattr(loaded, "whiten")
    # too few good images for a Gaussian per position: the default judges by the bank, and says so
    few = tmp_path / "few"
    (few / "good").mkdir(parents=True)
    for p in sorted((plates[0] / "good").glob("*.png"))[:12]:
        (few / "good" / p.name).write_bytes(p.read_bytes())
    r = runner.invoke(main, ["train", str(few), "--out", str(tmp_path / "rf"), "--task", "anomaly",
                             "--image-size", str(SIZE), "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["anomaly"]["scorer"] == "bank" and "too few" in m["anomaly"]["scorer_note"]
    assert "too few" in m["strategy_reason"] and m["anomaly"]["bank"] > 512   # the bank alone's size
    r = runner.invoke(main, ["train", str(plates[0]), "--out", str(tmp_path / "rs"), "--scorer", "gaussian"])
    assert r.exit_code != 0 and "--scorer" in r.output and "--task anomaly" in r.output
    r = runner.invoke(main, ["train", str(plates[0]), "--out", str(tmp_path / "r2"), "--task", "anomaly",
                             "--ok-classes", "fine"])
    assert r.exit_code != 0 and "--ok-classes" in r.output and "fine" in r.output
    r = runner.invoke(main, ["train", str(plates[0]), "--out", str(tmp_path / "r3"), "--task", "anomaly",
                             "--strategy", "linear"])
    assert r.exit_code != 0 and "--strategy" in r.output
    r = runner.invoke(main, ["train", str(plates[0]), "--out", str(tmp_path / "r4"), "--false-reject", "0.01"])
    assert r.exit_code != 0 and "--task anomaly" in r.output
    # a rate out of range is refused before any image is read or any model trained: no --out left
    for args in (["--task", "anomaly"], ["--guard"]):
        r = runner.invoke(main, ["train", str(plates[0]), "--out", str(tmp_path / "r5"), *args, "--false-reject", "0.5"])
        assert r.exit_code == 2 and "--false-reject" in r.output and not (tmp_path / "r5").exists()
    r = runner.invoke(main, ["study", "sample-size", str(plates[0]), "--task", "anomaly", "--false-reject", "0",
                             "--out", str(tmp_path / "s")])
    assert r.exit_code == 2 and "--false-reject" in r.output and not (tmp_path / "s").exists()


def test_gumbel_threshold_matches_the_quantile_it_promises():
    from lineside.train.anomaly import gumbel_survival, gumbel_threshold

    rng = np.random.default_rng(0)
    logs = rng.gumbel(0.3, 0.1, 40000)
    thr, sd, k = gumbel_threshold(np.exp(logs), 0.01)
    assert sd == pytest.approx(0.1 * math.pi / math.sqrt(6), rel=0.03)
    assert k == pytest.approx(3.137, abs=0.02)          # (-ln(-ln 0.99) - 0.5772) * sqrt(6) / pi
    assert float((logs > math.log(thr)).mean()) == pytest.approx(0.01, abs=0.002)
    assert float(gumbel_survival(math.log(thr), logs.mean(), logs.std())) == pytest.approx(0.01, abs=0.001)
    # from few images the threshold widens: new good images from the same distribution
    # exceed it at about the promised rate (averaged over many draws of 8 images)
    rates = []
    for _ in range(400):
        thr, _, k = gumbel_threshold(np.exp(rng.gumbel(0.3, 0.1, 8)), 0.01)
        rates.append(float((logs > math.log(thr)).mean()))
    assert k > 4.0 and np.mean(rates) == pytest.approx(0.01, abs=0.003)
    # a normal's quantile (2.33 sd) would be exceeded far more often by such a tail
    assert float((logs > logs.mean() + 2.326 * logs.std()).mean()) > 0.015


def test_the_promised_interval_holds_the_promised_rate_with_few_images_and_narrows_with_more():
    from lineside.train.anomaly import expected_false_reject, gumbel_threshold

    rng = np.random.default_rng(3)
    widths = []
    for n in (8, 32, 200):
        for _ in range(20):
            scores = np.exp(rng.gumbel(0.0, 0.1, n))
            e = expected_false_reject(scores, gumbel_threshold(scores, 0.01)[0])
            lo, hi = e["interval_90"]
            assert lo < 0.01 < hi and e["mean"] == pytest.approx(0.01, rel=0.3)
        widths.append(hi - lo)
    assert widths == sorted(widths, reverse=True)
    # a threshold set higher than the rule's promises less
    scores = np.exp(rng.gumbel(0.0, 0.1, 32))
    t = gumbel_threshold(scores, 0.01)[0]
    assert expected_false_reject(scores, t * 1.5)["mean"] < expected_false_reject(scores, t)["mean"]


def test_gumbel_k_is_the_same_for_the_same_number_of_images_and_shrinks_with_more():
    from lineside.train.anomaly import gumbel_k

    assert gumbel_k(0.01, 16) == gumbel_k(0.01, 16)
    ks = [gumbel_k(0.01, n) for n in (4, 8, 32, 200)]
    assert ks == sorted(ks, reverse=True) and ks[-1] == pytest.approx(3.137, abs=0.1)
    assert gumbel_k(0.001, 32) > gumbel_k(0.01, 32) > gumbel_k(0.05, 32)


def _placed_patches(rng, n: int, odd_at: int | None = None):
    """(n, 16 positions, 8 channels) patch features of aligned parts: position 3 of every
    good part shows a feature (channel 0 high) that is normal there and nowhere else; with
    `odd_at`, the part shows it at that position as well."""
    import torch

    f = rng.normal(0, 1, (n, 16, 8))
    f[:, 3, 0] += 6
    if odd_at is not None:
        f[:, odd_at, 0] += 6
    return torch.from_numpy(f.astype(np.float32))


def test_the_gaussian_scorer_sees_a_normal_look_in_the_wrong_place():
    """A patch that is normal at one place of an aligned part is anomalous at another: the
    bank, which forgets where a patch came from, does not see it; the Gaussian of each
    position does, and so does the mix of both."""
    from lineside.metrics import auroc
    from lineside.train.anomaly import distance_parts, fit_memory, image_scores

    rng = np.random.default_rng(0)
    good, test_good, odd = _placed_patches(rng, 60), _placed_patches(rng, 30), _placed_patches(rng, 30, odd_at=12)
    memory = fit_memory(good, (4, 4), "both", 256, 0, "cpu")
    y = np.r_[np.zeros(30), np.ones(30)]
    parts = distance_parts(torch_cat(test_good, odd), memory, "cpu")
    bank, gauss = (auroc(y, image_scores([p], [1.0], (4, 4))) for p in parts)
    mixed = auroc(y, image_scores(parts, [1.0, 1.0], (4, 4)))
    print(bank, gauss, mixed)
    assert bank < 0.75 and gauss > 0.95 and mixed > 0.9, (bank, gauss, mixed)


def torch_cat(*xs):
    import torch

    return torch.cat(xs)


def test_the_gaussian_whitens_each_position():
    """The fitted W makes each position's good patches unit-variance and uncorrelated (up to
    the shrinkage): the squared distance of a good patch averages the number of dimensions
    less what the shrinkage takes from each."""
    import torch

    from lineside.train.anomaly import fit_gaussians, mahalanobis

    rng = np.random.default_rng(1)
    mix = rng.normal(0, 1, (8, 8))
    f = torch.from_numpy((rng.normal(0, 1, (400, 4, 8)) @ mix + np.arange(4)[None, :, None] * 5).astype(np.float32))
    mean, whiten = fit_gaussians(f[:300], (2, 2), "cpu")
    np.testing.assert_allclose(mean.numpy()[:, 0], np.arange(4) * 5, atol=0.6)   # each position's own mean
    d2 = mahalanobis(f[300:], mean, whiten).pow(2)
    assert d2.shape == (100, 4)
    # shrunk towards SHRINK x the mean variance: each direction of variance l counts l / (l + ridge)
    from lineside.train.anomaly import SHRINK

    lam = np.linalg.eigvalsh(mix.T @ mix)
    expected = float(np.sum(lam / (lam + SHRINK * lam.mean())))
    assert 2 < expected <= 8 and abs(float(d2.mean()) - expected) < 0.15 * expected, (float(d2.mean()), expected)


def test_a_checkpoint_entry_names_a_known_scorer_and_its_positions():
    from lineside.train.anomaly import empty_model
    from lineside.train.backbones import BACKBONES

    entry = BACKBONES.get("efficientnet_lite0")
    stages, spec = entry.build().stages, entry.input_spec
    good = {"taps": [3, 5], "feature_dim": 152, "bank_size": 16, "projection": 8, "scorer": "both", "positions": 49}
    m = empty_model(stages, spec, good)
    assert m.scorer == "both" and m.whiten.shape == (49, 8, 8) and m.bank.shape == (16, 8)
    assert m.shape() == good
    for bad in ({"scorer": "magic"}, {"positions": 0}, {"positions": "49"}, {"scorer": "gaussian", "positions": -1}):
        with pytest.raises(ValueError):
            empty_model(stages, spec, {**good, **bad})
    old = {k: v for k, v in good.items() if k not in ("scorer", "positions")}   # before the Gaussians
    assert empty_model(stages, spec, old).scorer == "bank"


def test_coreset_spreads_over_the_patches():
    import torch

    from lineside.train.anomaly import greedy_coreset

    # four tight clusters: a coreset of four takes one point of each
    rng = np.random.default_rng(0)
    centres = np.eye(4, 16) * 10
    pts = np.concatenate([c + rng.normal(0, 0.01, (50, 16)) for c in centres]).astype(np.float32)
    chosen = greedy_coreset(torch.from_numpy(pts), 4, 0, "cpu").numpy()
    assert len(set(chosen // 50)) == 4
    assert len(greedy_coreset(torch.from_numpy(pts[:3]), 4, 0, "cpu")) == 3


def test_metadata_refuses_a_bad_anomaly_block():
    from lineside.metadata import ModelMetadata
    from lineside.spec import InputSpec

    spec = InputSpec(height=64, width=64)
    good = {"threshold": 1.5, "ok_classes": ["good"], "score_output": "anomaly_score", "map_output": "anomaly_map"}
    m = ModelMetadata(labels=("good", "anomalous"), spec=spec, anomaly=good)
    assert ModelMetadata.from_json(m.to_json()).anomaly == m.anomaly and m.task == "anomaly"
    for bad in ({**good, "threshold": 0}, {**good, "threshold": float("nan")}, {**good, "ok_classes": []},
                {**good, "map_output": None}, "x"):
        with pytest.raises(LinesideError, match="anomaly"):
            ModelMetadata(labels=("good", "anomalous"), spec=spec, anomaly=bad)


def test_opening_and_scoring_an_anomaly_bundle_loads_no_torch(anomaly_bundle):
    code = ("import sys, numpy as np\n"
            "from lineside.runtime.model import open_model\n"
            f"m = open_model({str(anomaly_bundle[0])!r}, backend='onnxruntime')\n"
            "s, maps = m.anomaly(np.zeros((1, m.spec.height, m.spec.width, 3), np.uint8))\n"
            "assert s.shape == (1,) and maps.ndim == 3\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_synth_draws_good_and_defective_parts(tmp_path):
    from lineside.synth import write_anomaly_dataset

    counts = write_anomaly_dataset(tmp_path, "card", good=4, defective=2, size=48, seed=0)
    assert counts == {"good": 4, "scratch": 2, "spot": 2}
    assert len(list((tmp_path / "spot").glob("*.png"))) == 2
    with pytest.raises(LinesideError):
        write_anomaly_dataset(tmp_path / "x", "widget")


def test_run_saves_a_heatmap_beside_every_ng_frame(anomaly_bundle, plates, tmp_path):
    from click.testing import CliRunner

    from lineside.cli import main
    from lineside.video import write_video

    video = tmp_path / "parts.avi"
    write_video(plates[1], video, size=(SIZE, SIZE), hold=1, noise=0.0)
    save = tmp_path / "saved"
    r = CliRunner().invoke(main, ["run", str(anomaly_bundle[0]), "--source", str(video), "--quiet", "--save",
                                  str(save), "--save-when", "all", "--log", str(tmp_path / "d.jsonl")])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    decisions = [d for d in rows if d.get("type") == "decision"]
    assert len(decisions) == 24 and {d["verdict"] for d in decisions} <= {"OK", "NG"}
    ng = sum(d["verdict"] == "NG" for d in decisions)
    assert ng >= 4     # most of the 8 dented plates
    # every decision carries the score relative to the threshold, NG exactly above 1
    assert all((d["anomaly_score"] > 1.0) == (d["verdict"] == "NG") for d in decisions)
    heatmaps = sorted(save.glob("lineside_*.heatmap.jpg"))
    assert len(heatmaps) == ng
    for h in heatmaps:
        assert (save / h.name.replace(".heatmap.jpg", ".jpg")).is_file()
        assert cv2.imread(str(h)).shape == (SIZE, SIZE, 3)


def test_the_decision_recovers_the_score_from_the_probabilities():
    """The camera loop reads only the probabilities; their log-odds give back the score."""
    from lineside.runtime.decide import Decider

    thr, scale = 2.0, 0.3
    d = Decider(["good", "anomalous"], ok_classes=("good",),
                anomaly={"threshold": thr, "scale": scale, "ok_classes": ["good"]})
    for score in (0.5, 1.9, 2.0, 2.4, 9.0):
        z = np.float32((score - thr) / scale)
        p = np.exp(np.array([0, z], np.float32) - max(0, z))
        p = (p / p.sum()).astype(np.float32)
        decision = d(p)
        assert decision.anomaly_score == pytest.approx(score / thr, rel=1e-5)
        assert decision.verdict == ("NG" if score > thr else "OK")
    assert Decider(["a", "b"])(np.array([0.3, 0.7], np.float32)).anomaly_score is None


def test_a_trigger_answer_and_the_modbus_register_carry_the_worst_score():
    import time

    from lineside.runtime import modbus as mb
    from lineside.runtime.trigger import Triggers

    answers = []
    t = Triggers(5.0, frames=2, votes=1, on_answer=lambda a: (answers.append(a), regs.answer(a)))
    regs = mb.RegisterMap(t, ["good", "anomalous"])
    assert regs.read(mb.RESULT_ANOMALY, 1) == [mb.NO_VALUE]          # no result yet
    assert regs.write(mb.TRIGGER, [1])
    now = time.perf_counter() + 0.001
    t.offer(now, "good", "OK", 0.9, 0.7)
    t.offer(now, "anomalous", "NG", 0.8, 1.6)
    assert answers and answers[0].anomaly_score == pytest.approx(1.6)
    assert answers[0].as_dict()["anomaly_score"] == pytest.approx(1.6)
    assert regs.read(mb.RESULT_ANOMALY, 1) == [1600]
    regs.write(mb.RESULTS_ACK, [1])
    regs.write(mb.TRIGGER, [1])
    t.offer(time.perf_counter() + 0.001, "good", "OK", 0.9)        # a classifier's frame: no score
    t.offer(time.perf_counter() + 0.001, "good", "OK", 0.9)
    assert regs.read(mb.RESULT_ANOMALY, 1) == [mb.NO_VALUE]
    t.close()


def test_int8_of_an_anomaly_model_quantizes_the_convolutions_only(anomaly_bundle):
    """The scorer (distances to the bank, the maximum) stays in float under NNCF: a distance
    between nearly equal 8-bit vectors would be mostly rounding."""
    import openvino as ov

    from lineside.export.quantize import openvino_beyond_convolutions

    model = ov.Core().read_model(str(anomaly_bundle[0] / "model_fp32.xml"))
    kinds = {op.get_friendly_name(): op.get_type_name() for op in model.get_ordered_ops()}
    ignored = set(openvino_beyond_convolutions(model))
    assert {"MatMul", "ReduceMax"} <= {kinds[n] for n in ignored}
    convolutions = {n for n, k in kinds.items() if k in ("Convolution", "GroupConvolution")}
    assert convolutions and not convolutions & ignored


def test_the_empirical_threshold_is_exceeded_at_the_promised_rate_whatever_the_tail():
    """At the Weibull position a new image exceeds the threshold with probability exactly
    the rate asked for, for any distribution (here exponential scores: P(X > t) = exp(-t));
    with too few images for that quantile there is none."""
    from lineside.train.anomaly import empirical_threshold

    rng = np.random.default_rng(0)
    rates = [math.exp(-empirical_threshold(rng.exponential(1.0, 199), 0.01)) for _ in range(400)]
    assert np.mean(rates) == pytest.approx(0.01, abs=0.0015)
    assert empirical_threshold(rng.exponential(1.0, 98), 0.01) is None
    assert empirical_threshold(rng.exponential(1.0, 98), 0.02) is not None


def test_score_maps_the_truths_defect_folders_onto_anomalous(anomaly_bundle, plates, tmp_path):
    from lineside.runtime.app import RunOptions, run_app
    from lineside.runtime.linescore import score_log
    from lineside.runtime.model import open_model
    from lineside.video import write_video

    video = tmp_path / "parts.avi"
    info = write_video(plates[1], video, size=(SIZE, SIZE), hold=1, noise=0.0)
    (tmp_path / "truth.json").write_text(json.dumps(info))
    model = open_model(anomaly_bundle[0], backend="onnxruntime")
    run_app(model, RunOptions(source=str(video), log=str(tmp_path / "d.sqlite")))
    r = score_log(tmp_path / "d.sqlite", tmp_path / "truth.json", "good")
    assert r["good_parts"] == 16 and r["defective_parts"] == 8
    one = next(row for row in r["sweep"] if row["reject_below"] is None and row["vote"] == "1/1")
    assert one["escapes"] + one["false_calls"] + one["right"] == 24


def test_openvino_model_api_loads_the_anomaly_ir_and_agrees_with_the_verdicts(anomaly_bundle, plates):
    """Model API's AnomalyDetection loads the bundle's model_api.xml as it is (the IR
    carries its model_info) and labels each image as lineside's own model does."""
    cv2 = pytest.importorskip("cv2")
    model_api = pytest.importorskip("model_api.models")
    from lineside.runtime.model import open_model
    from lineside.spec import resize_to_spec

    bundle, result = anomaly_bundle
    assert result["report"]["model_api"]["files"] == ["model_api.xml", "model_api.bin"]
    doc = json.loads((bundle / "bundle.json").read_text())
    assert set(doc["models"]["model_api_anomaly"]["files"]) == {"model_api.xml", "model_api.bin"}
    api = model_api.AnomalyDetection.create_model(str(bundle / "model_api.xml"))
    ours = open_model(bundle, backend="openvino")
    thr = ours.metadata.anomaly["threshold"]
    seen, close = set(), 0
    for path in sorted(plates[1].rglob("*.png")):
        bgr = cv2.imread(str(path))
        relative = float(ours.anomaly(resize_to_spec(bgr[..., ::-1], ours.spec)[None])[0][0]) / thr
        verdict = "anomalous" if relative > 1 else "good"
        answer = api(bgr)
        if abs(relative - 1) < 0.02:      # on the threshold, the two resizes may tip it either way
            close += 1
            continue
        assert answer.pred_label == verdict, (path, relative, answer.pred_label)
        assert answer.anomaly_map.shape == bgr.shape[:2]
        seen.add(verdict)
    assert seen == {"good", "anomalous"} and close <= 2


def test_the_review_and_live_pages_show_an_anomaly_models_heatmaps(anomaly_bundle, plates, tmp_path):
    """The review lists which saved NG frames have a heatmap and serves it; the live page
    draws the last frame's heatmap on request, and none for a classifier."""
    from types import SimpleNamespace

    import cv2

    from lineside.runtime.app import RunOptions, frame_heatmap, run_app
    from lineside.runtime.model import open_model
    from lineside.runtime.review import ReviewStore
    from lineside.runtime.web import LivePage, model_summary
    from lineside.video import write_video

    video = tmp_path / "parts.avi"
    write_video(plates[1], video, size=(SIZE, SIZE), hold=1, noise=0.0)
    model = open_model(anomaly_bundle[0], backend="onnxruntime")
    log, save = tmp_path / "d.sqlite", tmp_path / "saved"
    run_app(model, RunOptions(source=str(video), log=str(log), save_dir=save, save_when="all"))
    items = ReviewStore(log, save).items(limit=100)
    ng = [i for i in items if i["verdict"] == "NG"]
    assert ng and all(i["heatmap"] for i in ng) and not any(i["heatmap"] for i in items if i["verdict"] == "OK")
    store = ReviewStore(log, save)
    overlay = cv2.imdecode(np.frombuffer(store.frame_bytes(ng[0]["id"], heatmap=True), np.uint8), cv2.IMREAD_COLOR)
    assert overlay is not None and overlay.shape[:2] == (SIZE, SIZE)
    ok = next(i for i in items if i["verdict"] == "OK")
    assert store.frame_bytes(ok["id"], heatmap=True) is None
    page = LivePage("s", model_summary(model), "video", heatmap=frame_heatmap(model, None))
    assert model_summary(model)["task"] == "anomaly"
    frame = cv2.imread(str(sorted((plates[1] / "dent").glob("*.png"))[0]))
    page.observe(SimpleNamespace(index=7, image=frame), None, None)
    plain, heat = page.last_jpeg(), page.last_jpeg(heatmap=True)
    assert plain and heat and plain != heat
    assert LivePage("s", model_summary(model), "video").last_jpeg(heatmap=True) is None


def test_heatmaps_are_drawn_by_the_model_active_now(anomaly_bundle, plates):
    """With a product switch (products, updates), the saved and the page's heatmaps are drawn
    by whichever model is active when they are drawn, and hold none of the earlier ones: an
    update must free the model it replaced."""
    import gc
    import weakref
    from types import SimpleNamespace

    import cv2

    from lineside.runtime.app import active_heatmap, frame_heatmap
    from lineside.runtime.model import open_model

    first = open_model(anomaly_bundle[0], backend="onnxruntime")
    switch = SimpleNamespace(active=SimpleNamespace(model=first, roi=None))
    draw = active_heatmap(switch, first, None)
    frame = cv2.imread(str(sorted((plates[1] / "dent").glob("*.png"))[0]))
    assert np.array_equal(draw(frame), frame_heatmap(first, None)(frame))
    h, w = frame.shape[:2]
    switch.active = SimpleNamespace(model=open_model(anomaly_bundle[0], backend="onnxruntime"),
                                    roi=(0, 0, w // 2, h // 2))
    assert draw(frame).shape[:2] == (h // 2, w // 2)          # the new product's ROI, so its model
    held = weakref.ref(first)
    del first
    gc.collect()
    assert held() is None
    switch.active.model.metadata = SimpleNamespace(anomaly=None)   # a classifier took over
    with pytest.raises(ValueError, match="not an anomaly model"):
        draw(frame)


def test_sample_size_study_for_good_parts_alone(plates, tmp_path, monkeypatch):
    """study sample-size --task anomaly: each fit on k good images drawn at random, scored
    on every image not drawn (false rejects on the good ones, AUROC on the dents); the
    fits are kept, so the same command again fits nothing."""
    from click.testing import CliRunner

    from lineside.cli import main
    from lineside.train import anomaly_study

    out = tmp_path / "ss"
    args = ["study", "sample-size", str(plates[0]), "--task", "anomaly", "--shots", "4,8", "--repeats", "2",
            "--image-size", str(SIZE), "--out", str(out), "--json"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["task"] == "anomaly" and r["good_images"] == 30 and r["other_images"] == 6
    assert [(row["shots"], row["repeat"]) for row in r["runs"]] == [(4, 0), (4, 1), (8, 0), (8, 1)]
    for row in r["runs"]:
        assert row["good_scored"] == 30 - row["shots"] and 0 <= row["false_reject"] <= 1
        assert 50 <= row["auroc"] <= 100                 # the dents score above the good plates
    assert (out / "learning_curve.png").stat().st_size > 10_000 and "How many good parts" in (out / "report.md").read_text()
    monkeypatch.setattr(anomaly_study, "_one_fit", lambda *a, **k: pytest.fail("fitted again"))
    again = json.loads(CliRunner().invoke(main, args).stdout)
    assert again["runs"] == r["runs"]
    res = CliRunner().invoke(main, ["study", "sample-size", str(plates[0]), "--ok-classes", "good"])
    assert res.exit_code == 2 and "--task anomaly" in res.output
