"""Training on tiny synthetic data: it learns, it writes a reloadable run, it reports bad input."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
import yaml

from conftest import TINY
from tolerance import assert_close
from lineside.errors import LinesideError
from lineside.train.backbones import BACKBONES
from lineside.train.checkpoint import load_checkpoint
from lineside.train.config import TrainConfig
from lineside.train.evaluate import evaluate_run, predict_files
from lineside.train.run import train_run
from lineside.train.trainer import resolve_strategy


def test_finetune_learns_the_synthetic_parts(tiny_run, synth_test_dir):
    run, metrics = tiny_run
    assert metrics["strategy"] == "finetune"
    assert 0 < metrics["plan"]["frozen_stages"] < metrics["plan"]["total_stages"]
    report = evaluate_run(run, synth_test_dir, progress=False)
    # 5 classes: chance is 20%; fresh images drawn with another seed
    assert report["balanced_accuracy"] >= 0.8, report["per_class"]
    assert report["n"] == 50


def test_run_folder_has_every_output(tiny_run):
    run, metrics = tiny_run
    for name in ("model.pt", "config.yaml", "metrics.json", "history.csv", "confusion_matrix.png"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["labels"] == ["card", "cube", "hat", "screw", "torch"]
    assert saved["validation"]["n"] == sum(saved["val_counts"].values()) > 0
    cfg = TrainConfig.from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    assert cfg.image_size == TINY["image_size"] and cfg.strategy == "finetune"
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert rows[0]["stage"] == "head" and any(r["stage"] == "finetune" for r in rows)
    assert rows[0]["train_loss"] == "" and "nan" not in (run / "history.csv").read_text()   # none, not nan
    # where the time went: reading, building the model, each phase, the final scoring, writing
    seconds = saved["seconds"]
    assert {"total", "read_s", "setup_s", "bank_s", "head_s", "finetune_s", "score_s", "write_s"} <= set(seconds)
    assert all(v >= 0 for v in seconds.values()) and seconds["bank_s"] + seconds["finetune_s"] <= seconds["total"]


def test_checkpoint_reloads_with_weights_only_and_predicts_the_same(tiny_run, synth_test_dir):
    run, _ = tiny_run
    payload = torch.load(run / "model.pt", weights_only=True)  # plain data, nothing to unpickle
    assert payload["backbone"] == "efficientnet_lite0"
    loaded = load_checkpoint(run)
    assert loaded.spec.size == (64, 64)
    files = sorted((synth_test_dir / "cube").glob("*.png"))[:3]
    first = predict_files(run, files)
    second = predict_files(run / "model.pt", files)
    for a, b in zip(first, second):
        assert a["label"] == b["label"]
        assert set(a["probabilities"]) == set(loaded.labels)
        assert sum(a["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        for k in a["probabilities"]:
            assert a["probabilities"][k] == pytest.approx(b["probabilities"][k], abs=1e-6)


def test_finetune_keeps_frozen_stages_and_bn_statistics(synth_dir, tmp_path):
    from lineside.train.backbones import build_backbone

    _, pretrained = build_backbone("efficientnet_lite0", "imagenet")
    train_run(synth_dir, tmp_path, TrainConfig(strategy="finetune", unfreeze="2", **TINY), progress=False)
    trained = load_checkpoint(tmp_path).model.backbone
    frozen = len(trained.stages) - 2
    before, after = pretrained.state_dict(), trained.state_dict()
    for key in before:
        stage = int(key.split(".")[1])
        if stage < frozen or "running_" in key:
            assert torch.equal(before[key], after[key]), key
    changed = [k for k in before if int(k.split(".")[1]) >= frozen and not torch.equal(before[k], after[k])]
    assert changed, "the unfrozen stages did not train"


def test_passes_over_a_bank_keep_one_batch_shape(synth_dir, tmp_path, monkeypatch):
    """The head's fit and validation go over the bank in batches of one size (the last one
    filled up): on CUDA a short last batch is one more set of kernels to set up."""
    from lineside.train.heads import INFER_BATCH
    from lineside.train.infer import TORCH_CPU_BATCH, TORCH_CUDA_BATCH
    from lineside.train.model import Classifier

    sizes, features = [], Classifier.features

    def recorded(self, h, *args, **kwargs):
        if torch.is_inference_mode_enabled():
            sizes.append(len(h))
        return features(self, h, *args, **kwargs)

    monkeypatch.setattr(Classifier, "features", recorded)
    cfg = TrainConfig(strategy="finetune", unfreeze="1", val_fraction=0.4, **TINY)
    metrics = train_run(synth_dir, tmp_path, cfg, progress=False)
    n_train, n_val = sum(metrics["train_counts"].values()), sum(metrics["val_counts"].values())
    scoring = TORCH_CPU_BATCH if metrics["device"] == "cpu" else TORCH_CUDA_BATCH   # filled up as well
    allowed = {INFER_BATCH, cfg.batch_size, scoring}
    allowed |= {n for n in (n_train, n_val) if n < scoring}   # a whole job smaller than one batch: one shape
    short = {(n_train * cfg.views) % INFER_BATCH, n_val % cfg.batch_size}   # the last batches to fill up
    assert 0 not in short and not short & allowed
    assert sizes and set(sizes) <= allowed, sizes


@pytest.mark.parametrize("strategy", ["linear", "full", "scratch"])
def test_other_strategies_train_and_beat_chance(synth_dir, synth_test_dir, tmp_path, strategy):
    epochs = {"linear": 1, "full": 2, "scratch": 2}[strategy]
    cfg = TrainConfig(strategy=strategy, **{**TINY, "epochs": epochs})
    metrics = train_run(synth_dir, tmp_path, cfg, progress=False)
    assert metrics["strategy"] == strategy
    assert metrics["weights"] == ("none" if strategy == "scratch" else "imagenet")
    if strategy == "linear":
        assert evaluate_run(tmp_path, synth_test_dir, progress=False)["balanced_accuracy"] >= 0.6


def _in_fresh_process(code: str, timeout: int = 300) -> str:
    """What `code` prints, run in a new Python process (where nothing has loaded torch._dynamo)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_training_end_to_end_does_not_import_torch_dynamo(synth_dir, tmp_path):
    """torch.optim's AdamW imports torch._dynamo (over a second) on its first step, for graph
    breaks that only torch.compile needs; lineside's AdamW (optim.py) does without. A whole
    `full` training in a fresh process, where nothing else has loaded it."""
    code = ("import sys\n"
            "from lineside.train.config import TrainConfig\n"
            "from lineside.train.run import train_run\n"
            f"cfg = TrainConfig(strategy='full', **{dict(TINY, epochs=1)!r})\n"
            f"train_run({str(synth_dir)!r}, {str(tmp_path / 'run')!r}, cfg, progress=False)\n"
            "print('torch._dynamo' in sys.modules)")
    assert _in_fresh_process(code, timeout=600).strip() == "False"


def test_lineside_adamw_steps_exactly_as_torchs():
    """optim.AdamW runs torch's own step without its dynamo import: the same weights and
    optimizer state as torch.optim.AdamW after several steps (two parameter groups, weight
    decay, a closure), grad mode as it was before each step, and torch._dynamo not loaded
    until torch's AdamW steps (a fresh process)."""
    code = ("import sys, torch\n"
            "from lineside.train.optim import AdamW\n"
            "def run(cls):\n"
            "    torch.manual_seed(0)\n"
            "    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))\n"
            "    opt = cls([{'params': net[0].parameters(), 'lr': 1e-3}, {'params': net[2].parameters(), 'lr': 1e-2}],\n"
            "              weight_decay=0.05)\n"
            "    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))\n"
            "    modes = []\n"
            "    for i in range(6):\n"
            "        def closure():\n"
            "            opt.zero_grad()\n"
            "            loss = torch.nn.functional.cross_entropy(net(x), y)\n"
            "            loss.backward()\n"
            "            return loss\n"
            "        if i % 3:\n"
            "            loss = closure()\n"
            "        with torch.set_grad_enabled(i % 2 == 0):\n"
            "            loss = opt.step(closure) if i % 3 == 0 else (opt.step(), loss)[1]\n"
            "            modes.append(torch.is_grad_enabled())\n"
            "    return net.state_dict(), opt.state_dict(), modes, float(loss)\n"
            "mine = run(AdamW)\n"
            "assert 'torch._dynamo' not in sys.modules\n"
            "theirs = run(torch.optim.AdamW)\n"
            "assert 'torch._dynamo' in sys.modules\n"
            "same = all(torch.equal(mine[0][k], theirs[0][k]) for k in theirs[0])\n"
            "st = [(a['exp_avg'], b['exp_avg'], a['exp_avg_sq'], b['exp_avg_sq'])\n"
            "      for a, b in zip(mine[1]['state'].values(), theirs[1]['state'].values())]\n"
            "same_state = len(st) == 4 and all(torch.equal(p, q) and torch.equal(r, t) for p, q, r, t in st)\n"
            "print(same, same_state, mine[2], mine[3] == theirs[3])")
    assert _in_fresh_process(code).split() == ["True", "True", "[True,", "False,", "True,", "False,", "True,", "False]", "True"]


def test_auto_strategy_follows_images_per_class():
    assert resolve_strategy(TrainConfig(), 2)[0] == "linear"
    assert resolve_strategy(TrainConfig(), 10)[0] == "finetune"
    assert resolve_strategy(TrainConfig(weights="none"), 10)[0] == "scratch"
    assert resolve_strategy(TrainConfig(strategy="full"), 2)[0] == "full"


def test_corrupt_training_image_is_named_or_skipped(synth_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    bad = data / "hat" / "hat_9999.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(LinesideError, match="hat_9999.png.*--skip-bad"):
        train_run(data, tmp_path / "r1", TrainConfig(strategy="linear", **TINY), progress=False)
    cfg = TrainConfig(strategy="linear", skip_bad=True, **TINY)
    metrics = train_run(data, tmp_path / "r2", cfg, progress=False)
    assert metrics["skipped_images"] == [str(bad)]


def test_explicit_validation_folder_and_class_weighting(synth_dir, synth_test_dir, tmp_path):
    cfg = TrainConfig(strategy="linear", balance="sampler", **TINY)
    metrics = train_run(synth_dir, tmp_path, cfg, val=synth_test_dir, progress=False)
    assert metrics["validation"]["n"] == 50
    assert sum(metrics["train_counts"].values()) == 60


def test_config_rejects_bad_options_by_name(tmp_path):
    with pytest.raises(LinesideError, match="--strategy"):
        TrainConfig(strategy="magic")
    with pytest.raises(LinesideError, match="--unfreeze"):
        TrainConfig(unfreeze="-1")
    with pytest.raises(LinesideError, match="--bn-stats"):
        TrainConfig(bn_stats="sometimes")
    (tmp_path / "c.yaml").write_text("strategy: linear\nlearning_rate: 3\n")
    with pytest.raises(LinesideError, match="learning_rate"):
        TrainConfig.from_yaml(tmp_path / "c.yaml")
    (tmp_path / "ok.yaml").write_text("strategy: linear\naugment: {rot90: false}\n")
    cfg = TrainConfig.from_yaml(tmp_path / "ok.yaml", epochs=4, flip=False)
    assert (cfg.strategy, cfg.epochs, cfg.augment.rot90, cfg.augment.flip) == ("linear", 4, False, False)


def test_augmenter_keeps_shape_and_respects_switches():
    from lineside.train.augment import AugmentConfig, Augmenter

    img = np.zeros((32, 32, 3), np.uint8)
    img[:8, :8] = 255  # a bright corner that flips and rotations would move
    still = Augmenter(AugmentConfig(flip=False, rot90=False, affine=0, color=0, blur=0, noise=0), 0)
    moving = Augmenter(AugmentConfig(affine=0, color=0, blur=0, noise=0), 0)
    assert all(np.array_equal(still(img), img) for _ in range(10))
    outs = [moving(img) for _ in range(20)]
    assert all(o.shape == img.shape and o.dtype == np.uint8 for o in outs)
    assert any(not np.array_equal(o, img) for o in outs)


def test_finetune_all_fits_the_head_first_then_trains_every_stage(synth_dir, tmp_path):
    from lineside.train.backbones import build_backbone

    _, pretrained = build_backbone("efficientnet_lite0", "imagenet")
    cfg = TrainConfig(strategy="finetune", unfreeze="all", **{**TINY, "epochs": 1})
    metrics = train_run(synth_dir, tmp_path, cfg, progress=False)
    assert metrics["plan"]["frozen_stages"] == 0
    rows = list(csv.DictReader(open(tmp_path / "history.csv")))
    assert [r["stage"] for r in rows] == ["finetune"]
    assert "head_s" in metrics["seconds"]
    stem = "stages.0.0.weight"
    assert not torch.equal(pretrained.state_dict()[stem], load_checkpoint(tmp_path).model.backbone.state_dict()[stem])


def test_ctrl_c_during_training_still_saves_a_model(synth_dir, tmp_path, monkeypatch):
    from lineside.train import loop

    calls = {"n": 0}
    original = loop.set_train_mode

    def interrupt_on_second_epoch(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(loop, "set_train_mode", interrupt_on_second_epoch)
    metrics = train_run(synth_dir, tmp_path, TrainConfig(strategy="finetune", **TINY), progress=False)
    assert metrics["interrupted"] is True
    rows = list(csv.DictReader(open(tmp_path / "history.csv")))
    assert [r["stage"] for r in rows] == ["head", "finetune"]
    assert load_checkpoint(tmp_path).labels == metrics["labels"]


def test_linear_head_on_middle_stages_learns_reloads_and_exports(synth_dir, synth_test_dir, tmp_path):
    """--taps mid: the head reads the pooled outputs of the middle stages (average and
    maximum); the checkpoint
    keeps them, a reload predicts the same, and the exported graph matches PyTorch."""
    from lineside.export.bundle import export_bundle
    from lineside.train.model import resolve_taps, stage_widths

    run = tmp_path / "run"
    metrics = train_run(synth_dir, run, TrainConfig(strategy="linear", taps="mid", **TINY), progress=False)
    assert metrics["strategy"] == "linear"
    loaded = load_checkpoint(run)
    n = len(loaded.model.stages)
    assert loaded.model.taps == resolve_taps("mid", n) == tuple(range(n // 2, n - 1))
    widths = stage_widths(loaded.model.backbone)
    # each tapped stage's average and maximum
    assert loaded.model.pool == "avgmax"
    assert loaded.model.head.in_features == 2 * sum(widths[t] for t in loaded.model.taps) != widths[-1]
    assert evaluate_run(run, synth_test_dir, progress=False)["balanced_accuracy"] >= 0.6
    files = sorted((synth_test_dir / "hat").glob("*.png"))[:2]
    assert [p["probabilities"] for p in predict_files(run, files)] == \
        [p["probabilities"] for p in predict_files(run / "model.pt", files)]
    report = export_bundle(run, tmp_path / "bundle", int8=False)["report"]
    assert report["parity"]["passed"] and all(r["max_abs_diff"] <= 1e-4 for r in report["parity"]["results"].values())


def test_linear_recipe_averages_quarter_turns_at_prediction_and_export_can_drop_them(synth_dir, tmp_path):
    """--tta auto: a linear head predicts on the four quarter turns of an image, averaged,
    so a turned part gets the same probabilities; the checkpoint and the exported graph
    keep the views (parity with PyTorch), and export --tta off writes a one-pass model."""
    import onnxruntime as ort

    from lineside.export.bundle import export_bundle
    from lineside.train.augment import orient

    run = tmp_path / "run"
    cfg = TrainConfig(strategy="linear", taps="mid", **{**TINY, "views": None})
    metrics = train_run(synth_dir, run, cfg, progress=False)
    assert metrics["plan"]["test_views"] == [0, 1, 2, 3] and metrics["plan"]["views"] == 8
    model = load_checkpoint(run).model
    assert model.views == (0, 1, 2, 3)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    img[0, :20, :30] = 255   # not symmetric: each turn is a different image

    def probs(m, batch):
        with torch.no_grad():
            return torch.softmax(m(torch.from_numpy(batch).permute(0, 3, 1, 2).float()), 1).numpy()

    turned = np.stack([orient(img[0], 1)])
    assert not np.array_equal(turned, img)
    assert_close(probs(model, turned), probs(model, img))
    single = load_checkpoint(run).model
    single.views = None
    assert np.abs(probs(single, turned) - probs(single, img)).max() > 1e-4   # one view alone is not invariant

    kept = export_bundle(run, tmp_path / "b4", formats=["onnx"], int8=False)
    off = export_bundle(run, tmp_path / "b1", formats=["onnx"], int8=False, tta=False)
    assert kept["bundle"]["metadata"]["test_views"] == [0, 1, 2, 3] and off["bundle"]["metadata"]["test_views"] is None
    assert kept["report"]["parity"]["passed"] and off["report"]["parity"]["passed"]
    s4 = ort.InferenceSession(str(tmp_path / "b4" / "model_fp32.onnx"), providers=["CPUExecutionProvider"])
    s1 = ort.InferenceSession(str(tmp_path / "b1" / "model_fp32.onnx"), providers=["CPUExecutionProvider"])
    both = np.concatenate([img, turned])
    p4, p1 = s4.run(None, {"image": both})[0], s1.run(None, {"image": both})[0]
    assert_close(p4[0], p4[1])
    np.testing.assert_allclose(p4, probs(model, both), atol=1e-4)
    np.testing.assert_allclose(p1, probs(single, both), atol=1e-4)


def test_bank_starts_with_the_allowed_flips_and_turns_exactly(synth_dir):
    """The cached views of each training image are first its flips and quarter turns (the
    ones --flip/--rot90 allow), exactly, then randomly augmented copies."""
    from lineside.dataset import load_arrays, load_image_set
    from lineside.train.augment import orient, orientations, test_views
    from lineside.train.data import to_tensor
    from lineside.train.infer import exact_fp32
    from lineside.train.trainer import Trainer

    assert orientations(True, True) == (0, 2, 1, 3, 4, 6, 5, 7) and test_views(True, True) == (0, 1, 2, 3)
    assert orientations(True, False) == (0, 2, 4, 6) and test_views(True, False) == (0, 2, 4, 6)
    assert orientations(False, True) == (0, 2, 1, 3) and orientations(False, True, square=False) == (0, 2)
    assert orientations(False, False) == (0,) and test_views(False, False) == ()
    cfg = TrainConfig(strategy="linear", taps="mid", **TINY)
    trainer = Trainer(cfg, ["a", "b"], BACKBONES.get(cfg.backbone).input_spec.with_size(64), progress=False)
    images = load_image_set(synth_dir)
    x, _, _ = load_arrays(images.subset([0, 1, 2]), trainer.spec, progress=False)
    y = np.zeros(3, np.int64)
    bank, _ = trainer.build_bank(x, y, len(trainer.model.stages), 10)
    assert len(bank) == 30
    group = trainer.orientations()
    with torch.no_grad():
        for v, k in enumerate(group):
            with exact_fp32():      # as the bank is computed (on CUDA, not in TensorFloat-32)
                expect = trainer.model.embed(to_tensor(np.stack([orient(im, k) for im in x]), trainer.device))
            np.testing.assert_allclose(bank[v * 3:(v + 1) * 3].numpy(), expect.cpu().numpy(), atol=1e-4)
    assert not any(torch.allclose(bank[8 * 3 + i], bank[v * 3 + i], atol=1e-3) for i in range(3) for v in range(8))


def test_tta_option_is_checked():
    with pytest.raises(LinesideError, match="--tta"):
        TrainConfig(tta="sometimes")
    from lineside.train.trainer import Trainer

    cfg = TrainConfig(strategy="linear", tta="on", **TINY).override(flip=False, rot90=False)
    trainer = Trainer(cfg, ["a", "b"], BACKBONES.get(cfg.backbone).input_spec.with_size(64), progress=False)
    with pytest.raises(LinesideError, match="--tta on"):
        trainer.test_views("linear")
    assert Trainer(cfg.override(tta="auto"), ["a", "b"], trainer.spec, progress=False).test_views("linear") is None


def test_taps_are_checked():
    from lineside.train.model import resolve_taps

    assert resolve_taps("last", 9) is None and resolve_taps("5,3,3", 9) == (3, 5)
    for bad in ("9", "x", "-1", ""):
        if bad:
            with pytest.raises(LinesideError, match="--taps"):
                resolve_taps(bad, 9)
    with pytest.raises(LinesideError, match="--strategy linear"):
        from lineside.train.trainer import Trainer

        Trainer(TrainConfig(strategy="finetune", taps="mid", **TINY), ["a", "b"], None, progress=False)


def test_pooled_stage_features_run_in_one_batch_shape_and_match_image_by_image():
    from lineside.train import heads
    from lineside.train.backbones import build_backbone
    from lineside.train.data import place
    from lineside.train.infer import TORCH_CPU_BATCH
    from lineside.train.model import Classifier

    entry, backbone = build_backbone("efficientnet_lite0", "imagenet")
    model = place(Classifier(backbone, entry.feature_dim, 3, entry.input_spec.with_size(64)), "cpu")
    x = np.random.default_rng(0).integers(0, 256, (11, 64, 64, 3), dtype=np.uint8)
    sizes = []
    hook = model.stages[0].register_forward_hook(lambda m, i, o: sizes.append(len(o)))
    feats = heads.pooled_stage_features(model, x, torch.device("cpu"), pool="avgmax")
    hook.remove()
    assert len(x) % TORCH_CPU_BATCH and set(sizes) == {TORCH_CPU_BATCH}    # the last batch filled up
    alone = [heads.pooled_stage_features(model, x[i:i + 1], torch.device("cpu"), pool="avgmax") for i in (0, 10)]
    for k, f in enumerate(feats):
        assert f.shape[0] == len(x)
        assert_close(f[[0, 10]], np.concatenate([a[k] for a in alone]))


def test_cross_validated_probe_tells_informative_features_from_noise():
    from lineside.train.heads import cross_validated_probe

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 8)
    informative = rng.normal(0, 0.3, (24, 10)) + np.eye(3)[y] @ rng.normal(0, 3, (3, 10))
    noise = rng.normal(0, 1, (24, 10))
    assert cross_validated_probe(informative, y, 0) >= 0.9
    assert cross_validated_probe(noise, y, 0) <= 0.7


def test_a_linear_head_fit_does_not_import_torch_dynamo():
    """torch.optim would import torch._dynamo (seconds) on an L-BFGS fit's first call; the
    heads module keeps it out, in a fresh process where nothing else loaded it."""
    code = ("import sys, numpy as np\n"
            "from lineside.train.heads import cross_validated_probe\n"
            "y = np.repeat(np.arange(3), 8)\n"
            "rng = np.random.default_rng(0)\n"
            "x = rng.normal(0, 0.3, (24, 10)) + np.eye(3)[y] @ rng.normal(0, 3, (3, 10))\n"
            "assert cross_validated_probe(x, y, 0) >= 0.9\n"
            "print('torch._dynamo' in sys.modules)")
    assert _in_fresh_process(code).strip() == "False"


def test_auto_picks_a_middle_stage_head_only_when_it_wins_in_cross_validation(synth_dir, tmp_path, monkeypatch):
    """auto compares linear heads on the last and on the middle stages over the training
    images: middle stages that separate the classes clearly better make it choose a
    linear head on them; otherwise fine-tuning stays the recipe."""
    from lineside.train import auto
    from lineside.train.model import resolve_taps

    real = auto.pooled_stage_features

    def noise_in(which):
        def features(model, x, device, **kw):
            feats = real(model, x, device, **kw)
            n = len(feats)
            rng = np.random.default_rng(1)
            for k in ([n - 1] if which == "last" else resolve_taps("mid", n)):
                feats[k] = rng.normal(0, 1, feats[k].shape).astype(np.float32)
            return feats
        return features

    monkeypatch.setattr(auto, "pooled_stage_features", noise_in("last"))
    metrics = train_run(synth_dir, tmp_path / "tex", TrainConfig(**TINY), progress=False)
    assert metrics["strategy"] == "linear" and "middle-stage" in metrics["strategy_reason"]
    cv = metrics["auto_cross_validation"]
    assert cv["middle_stages"] >= cv["last_stage"] + auto.AUTO_TAPS_MARGIN
    assert load_checkpoint(tmp_path / "tex").model.taps is not None

    monkeypatch.setattr(auto, "pooled_stage_features", noise_in("mid"))
    metrics = train_run(synth_dir, tmp_path / "obj", TrainConfig(**TINY), progress=False)
    cv = metrics["auto_cross_validation"]
    assert metrics["strategy"] == "finetune" and cv["middle_stages"] < cv["last_stage"]
    assert load_checkpoint(tmp_path / "obj").model.taps is None
    # the fine-tuning it chose was estimated (one batch timed) before it ran; calibration off: no folds.
    # On CUDA a job this small takes fixed costs (the head's L-BFGS iterations, kernels set up for
    # each new shape) that steps of a few milliseconds do not predict: there, only an upper bound.
    took = sum(metrics["seconds"][k] for k in ("bank_s", "head_s", "finetune_s"))
    assert 0 < cv["finetune_estimate_s"] / took < 4
    if metrics["device"] == "cpu":
        assert cv["finetune_estimate_s"] / took > 0.25
    assert "within --time-budget 150 s" in metrics["strategy_reason"]

    # ... and when that estimate is over the time budget, the better cross-validated linear head is
    # trained: here the last stage's
    metrics = train_run(synth_dir, tmp_path / "slow", TrainConfig(**TINY, time_budget=1e-3), progress=False)
    assert metrics["strategy"] == "linear" and "over --time-budget" in metrics["strategy_reason"]
    assert "on the last stage instead" in metrics["strategy_reason"]
    assert metrics["auto_cross_validation"]["finetune_estimate_s"] > 1e-3
    assert load_checkpoint(tmp_path / "slow").model.taps is None
    # 0: no limit, nothing estimated
    metrics = train_run(synth_dir, tmp_path / "free", TrainConfig(**TINY, time_budget=0), progress=False)
    assert metrics["strategy"] == "finetune" and "finetune_estimate_s" not in metrics["auto_cross_validation"]
    # over the budget, the middle stages' head when they scored better (by less than the margin that
    # picks them outright)
    scores = iter([0.80, 0.81])   # last stage, middle stages
    monkeypatch.setattr(auto, "cross_validated_probe", lambda *a, **k: next(scores))
    metrics = train_run(synth_dir, tmp_path / "slow_mid", TrainConfig(**TINY, time_budget=1e-3), progress=False)
    assert metrics["strategy"] == "linear" and "maximum of stages" in metrics["strategy_reason"]
    assert load_checkpoint(tmp_path / "slow_mid").model.taps is not None


# --- frozen forward passes: PyTorch, or OpenVINO converted in memory on the CPU -----------

def _images(n, size=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_frozen_forward_in_openvino_matches_pytorch(tiny_run, monkeypatch):
    """Scores, pooled features and trunk activations are the same whichever runs them, and a
    large job on the CPU really runs in OpenVINO (small ones stay in PyTorch; how large
    counts pixels: 192 images of 224 px are worth a conversion, of 64 px not), converted
    from one traced pass of the network."""
    from lineside.train import infer
    from lineside.train.infer import FrozenForward
    from lineside.train.trainer import predict_proba, score

    model = load_checkpoint(tiny_run[0]).model.eval()
    x = _images(40)
    for fn in (model.embed, lambda t: model.trunk(t, 2), lambda t: torch.softmax(model(t), 1)):
        calls = []

        def counted(t, fn=fn):
            calls.append(len(t))
            return fn(t)

        fast = FrozenForward(model, counted, x[:1], "cpu", n_images=10_000)
        assert calls == [1]      # traced once; torch.jit.trace's check would run it twice more (infer._traced)
        slow = FrozenForward(model, fn, x[:1], "cpu", n_images=1)
        assert (fast.backend, slow.backend) == ("openvino", "torch")
        a, b = fast.map(x), slow.map(x)
        assert a.shape == b.shape and float((a - b).abs().max()) < 1e-4 * max(1.0, float(b.abs().max()))
    assert infer.backend_for("cpu", 192) == "openvino" and infer.backend_for("cpu", 192, (64, 64)) == "torch"
    assert infer.backend_for("cpu", 2400, (64, 64)) == "openvino" and infer.backend_for("cuda", 10**6) == "torch"
    monkeypatch.setattr(infer, "MIN_OPENVINO_IMAGES", 2)      # this small job in OpenVINO too
    big = _images(40, seed=1)
    assert_close(score(model, big), predict_proba(model, big))


def test_a_conversion_is_reused_until_a_weight_it_reads_changes_and_views_score_as_in_pytorch(tiny_run,
                                                                                           monkeypatch):
    """In OpenVINO score() converts the single-view network and averages the test-time views
    itself: the probabilities of PyTorch's forward with its views. The conversion is reused
    while the weights and statistics it reads hold the same values (the head is not one of
    them; BatchNorm statistics are, even changed where PyTorch does not count the change)."""
    from lineside.train import infer
    from lineside.train.infer import embed_tensors, frozen_forward
    from lineside.train.trainer import predict_proba, score

    model = load_checkpoint(tiny_run[0]).model.eval()
    model.views = (0, 1, 2, 3)
    monkeypatch.setattr(infer, "MIN_OPENVINO_IMAGES", 4)      # score these few images in OpenVINO
    x = _images(24, seed=4)
    assert_close(score(model, x), predict_proba(model, x))

    def convert():
        return frozen_forward(model, model.embed, "embed", x[:1], "cpu", 10_000, depends=embed_tensors(model))

    kept = infer._last_conversion[0]
    first = convert()
    assert first.backend == "openvino" and kept is not None and first is kept[3]   # score's own conversion
    assert convert() is first
    with torch.no_grad():
        model.head.weight.mul_(2.0)
    assert convert() is first
    with torch.no_grad():
        next(model.backbone.stages[-1].parameters()).mul_(1.5)
    second = convert()
    assert second is not first and float((second.map(x[:8]) - first.map(x[:8])).abs().max()) > 1e-4
    assert convert() is second
    bn = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_mean.data.add_(0.5)           # no in-place version counted
    third = convert()
    assert third is not second and float((third.map(x[:8]) - second.map(x[:8])).abs().max()) > 1e-4
    assert_close(score(model, x), predict_proba(model, x))


def test_frozen_forward_can_be_kept_in_pytorch(tiny_run, monkeypatch):
    from lineside.train.infer import FrozenForward

    model = load_checkpoint(tiny_run[0]).model.eval()
    monkeypatch.setenv("LINESIDE_FAST_INFERENCE", "torch")
    run = FrozenForward(model, model.embed, _images(1), "cpu", n_images=10_000)
    assert run.backend == "torch"
    x = _images(2 * run.batch_size + 5, seed=3)     # the last batch is filled up to the batch size
    whole, one_by_one = run.map(x), torch.cat([run.map(x[i:i + 1]) for i in range(len(x))])
    assert whole.shape == one_by_one.shape and float((whole - one_by_one).abs().max()) < 1e-4


# --- data-parallel training under torchrun (gloo on CPU processes here) --------------------

def test_every_rank_takes_an_equal_share_of_each_epoch():
    from lineside.train.distributed import Dist, shard

    order = np.random.default_rng(0).permutation(23)
    parts = [shard(order, Dist(r, 3, r)) for r in range(3)]
    assert {len(p) for p in parts} == {8}                      # padded: every rank steps as often
    assert set(np.concatenate(parts)) == set(order)
    assert list(shard(order, Dist())) == list(order)


@pytest.mark.parametrize("batched", [False, True], ids=["per-image", "batched"])
def test_two_processes_train_data_parallel_and_only_rank_0_writes(synth_dir, synth_test_dir, tmp_path, monkeypatch,
                                                                  batched):
    """`lineside train --gpus 2` without CUDA: torchrun starts two CPU processes (gloo),
    DistributedDataParallel trains `full`, rank 0 writes a complete run folder and prints
    once; the model reloads and scores like a one-process run. `batched`: each process
    takes its share of every epoch from images kept as one tensor, augmented a batch at a
    time, as on GPUs (LINESIDE_BATCH_AUGMENT=1)."""
    import subprocess
    import sys

    if batched:
        monkeypatch.setenv("LINESIDE_BATCH_AUGMENT", "1")

    common = ["--strategy", "full", "--image-size", "64", "--epochs", "4", "--batch-size", "8", "--device", "cpu",
              "--quiet", "--json", "--threads", "1"]
    two = tmp_path / "two"
    scratch = tmp_path / "tmp"          # the processes' temporary folder: torchrun's logs leave nothing there
    scratch.mkdir()
    proc = subprocess.run([sys.executable, "-m", "lineside.cli", "train", str(synth_dir), "--out", str(two),
                           *common, "--gpus", "2"], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TMPDIR=str(scratch)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    left = [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")]  # PyTorch's kept cache
    assert not left, left
    metrics = json.loads(proc.stdout)                       # one JSON object: rank 1 printed nothing
    assert metrics["processes"] == 2 and metrics["device"] == "cpu"
    for name in ("model.pt", "metrics.json", "history.csv", "config.yaml", "confusion_matrix.png"):
        assert (two / name).is_file(), name
    with open(two / "history.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2", "3", "4"]
    one = tmp_path / "one"
    train_run(synth_dir, one, TrainConfig(strategy="full", image_size=64, epochs=4, batch_size=8, device="cpu"),
              progress=False)
    acc_two = evaluate_run(two, synth_test_dir, progress=False)["balanced_accuracy"]
    acc_one = evaluate_run(one, synth_test_dir, progress=False)["balanced_accuracy"]
    assert acc_two > 0.6 and abs(acc_two - acc_one) < 0.2, (acc_two, acc_one)


def test_batch_augmentation_draws_per_image_and_keeps_flips_and_turns_exact():
    """On the device a batch is augmented at once, but every image gets its own draw (not
    one draw for the batch); with only flips and turns on, each output is exactly one
    orientation of its input."""
    from lineside.train.augment import AugmentConfig, BatchAugmenter, orient

    torch.manual_seed(0)
    x = _images(16, size=32)
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float()
    only_turns = BatchAugmenter(AugmentConfig(affine=0, color=0, blur=0, noise=0))
    out = only_turns(t.clone()).permute(0, 2, 3, 1).numpy().astype(np.uint8)
    found = []
    for im, o in zip(x, out):
        ks = [k for k in range(8) if np.array_equal(orient(im, k), o)]
        assert ks, "not an exact flip or turn"
        found.append(ks[0])
    assert len(set(found)) > 2                      # per image, not one draw for the whole batch
    full = BatchAugmenter(AugmentConfig())(t.clone())
    assert full.shape == t.shape and float(full.min()) >= 0 and float(full.max()) <= 255
    diffs = (full - t).abs().mean((1, 2, 3))
    assert float(diffs.std()) > 0                   # images changed by different amounts
    # the jitter the Augmenter draws: turns of up to 10 degrees, scale 0.9-1.1, shifts up to 5%
    d = BatchAugmenter(AugmentConfig(flip=False, rot90=False), seed=1).draw(2000, 32, 32)
    m, shift = d[:, [0, 1, 3, 4]].reshape(-1, 2, 2), d[:, [2, 5]]
    angle, scale = np.degrees(np.arctan2(m[:, 1, 0], m[:, 0, 0])), 1 / np.sqrt(np.linalg.det(m))
    jittered = np.abs(scale - 1) + np.abs(angle) > 1e-6
    assert 0.65 < jittered.mean() < 0.75
    assert 9 < np.abs(angle).max() <= 10 and 1.09 < scale.max() <= 1.1 and 0.9 <= scale.min() < 0.91
    assert 0.09 < np.abs(shift).max() <= 0.1        # 5% of a side: 0.1 of the grid's -1..1
    # on a wide image the grid's coordinates stretch differently across and down: in
    # pixels the jitter must still be a turn and a scale, not a shear
    d = BatchAugmenter(AugmentConfig(flip=False, rot90=False), square=False, seed=2).draw(500, 32, 64)
    half = np.diag([32.0, 16.0])                    # pixels per grid unit across, down
    pix = half @ d[:, [0, 1, 3, 4]].reshape(-1, 2, 2) @ np.linalg.inv(half)
    gram = np.transpose(pix, (0, 2, 1)) @ pix
    assert np.abs(gram[:, 0, 1]).max() < 1e-5 and np.allclose(gram[:, 0, 0], gram[:, 1, 1], rtol=1e-5)


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_full_training_with_batch_augmentation_learns(synth_dir, synth_test_dir, tmp_path, monkeypatch, layout):
    """The batched (CUDA) augmentation path, forced on the CPU: the images go to the device
    once as uint8 and the model still learns the parts, in either memory layout (the
    batches and the weights are in the one asked for)."""
    from lineside.train import loop

    monkeypatch.setenv("LINESIDE_BATCH_AUGMENT", "1")
    monkeypatch.setenv("LINESIDE_CHANNELS_LAST", {"channels_last": "1", "nchw": "0"}[layout])
    fmt = torch.contiguous_format if layout == "nchw" else torch.channels_last
    seen = []
    real = loop.train_one_epoch

    def watched(forward, optimizer, batches, *args, **kw):
        stem = next(p for p in forward.parameters() if p.dim() == 4)

        def checked():
            for xb, yb in batches:
                seen.append((xb.is_contiguous(memory_format=fmt), stem.is_contiguous(memory_format=fmt)))
                yield xb, yb

        return real(forward, optimizer, checked(), *args, **kw)

    monkeypatch.setattr(loop, "train_one_epoch", watched)
    out = tmp_path / "run"
    train_run(synth_dir, out, TrainConfig(strategy="full", image_size=64, epochs=5, batch_size=16, device="cpu",
                                          val_fraction=0.25), progress=False)
    assert seen and all(batch and weights for batch, weights in seen)
    assert evaluate_run(out, synth_test_dir, progress=False)["balanced_accuracy"] > 0.6
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert len(rows) == 5
    assert all(0 < float(r["first_step_seconds"]) < float(r["train_seconds"]) <= float(r["seconds"]) for r in rows)
    assert all(r["val_balanced_accuracy"] for r in rows)          # validated on the device each epoch


@pytest.mark.parametrize("strategy", ["full", "finetune", "auto"])
def test_every_recipe_trains_under_mixed_precision_as_on_a_gpu(synth_dir, tmp_path, monkeypatch, strategy):
    """On CUDA the steps run under bfloat16 autocast (Amp), so what a forward pass returns
    there is bfloat16: anything that hands it to numpy, or mixes it with float32 tensors
    where PyTorch does not promote, fails on a GPU only. Amp is forced into bfloat16 on the
    CPU here (with the batched augmentation the GPU uses), through end-to-end training,
    fine-tuning on the bank with validation and auto's cost estimate: each run completes,
    its steps did run in bfloat16, and it saves float32 weights that score finite
    probabilities."""
    from lineside.train import loop

    monkeypatch.setenv("LINESIDE_BATCH_AUGMENT", "1")

    def bfloat16(self, device):
        self.device_type, self.enabled, self.dtype = device.type, True, torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda", enabled=False)

    monkeypatch.setattr(loop.Amp, "__init__", bfloat16)
    dtypes = []
    real = loop.train_one_epoch

    def watched(forward, *args, **kw):
        def forward_seen(xb):
            out = forward(xb)
            dtypes.append(out.dtype)
            return out

        return real(forward_seen, *args, **kw)

    monkeypatch.setattr(loop, "train_one_epoch", watched)
    out = tmp_path / "run"
    metrics = train_run(synth_dir, out, TrainConfig(strategy=strategy, image_size=64, epochs=2, batch_size=16,
                                                    views=2, device="cpu", val_fraction=0.25), progress=False)
    if metrics["strategy"] != "linear":     # auto may choose a head on frozen features: no epochs
        assert dtypes and set(dtypes) == {torch.bfloat16}
    model = load_checkpoint(out).model.eval()
    assert all(t.dtype == torch.float32 for t in model.state_dict().values() if t.is_floating_point())
    from lineside.train.trainer import predict_proba

    p = predict_proba(model, _images(3))
    assert np.isfinite(p).all() and np.allclose(p.sum(1), 1, atol=1e-5)


def test_validation_on_the_device_scores_like_predict_proba(tiny_run):
    """Validation during end-to-end training: images already on the device, every batch of
    the training's size (the last one filled up and its extra rows dropped)."""
    from lineside.train.loop import Amp, device_logits
    from lineside.train.trainer import predict_proba

    model = load_checkpoint(tiny_run[0]).model.eval()
    model.views = None                      # as during training
    x = _images(21)
    logits = device_logits(model, torch.from_numpy(x), 8, Amp(torch.device("cpu")))
    assert logits.shape == (21, model.head.out_features)
    assert_close(torch.softmax(logits, 1).numpy(), predict_proba(model, x))


def test_mixed_precision_is_bfloat16_only_where_the_gpu_computes_in_it(monkeypatch):
    """torch.cuda.is_bf16_supported() also says yes for GPUs that only emulate bfloat16
    (T4, V100: compute capability 7.x), where float16 is the fast choice; Ampere and later
    (8.0+) compute in bfloat16. The GPU's properties are stood in for here."""
    from types import SimpleNamespace

    from lineside.train.loop import amp_dtype

    monkeypatch.setattr(torch.version, "hip", None)
    for major, dtype in ((6, torch.float16), (7, torch.float16), (8, torch.bfloat16), (9, torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, m=major: SimpleNamespace(major=m))
        assert amp_dtype(torch.device("cuda")) == dtype


def test_the_optimizer_is_fused_on_cuda_so_that_no_step_waits_for_the_gpu():
    """On CUDA, AdamW's fused form: GradScaler (float16 on older GPUs) then hands it the
    overflow check as a tensor instead of reading it back each step. On the CPU the
    default form stays (same results as before)."""
    from lineside.train.loop import optimizer

    def groups():
        return [{"params": [torch.nn.Parameter(torch.zeros(3))], "lr": 1e-3}]

    cuda = optimizer(groups(), 0.01, torch.device("cuda"))
    assert cuda.defaults["fused"] is True and getattr(cuda, "_step_supports_amp_scaling", False)
    assert not optimizer(groups(), 0.01, torch.device("cpu")).defaults["fused"]


@pytest.mark.parametrize("strategy", ["full", "finetune"])
def test_no_training_step_waits_for_the_gpu(synth_dir, tmp_path, monkeypatch, strategy):
    """Each epoch's batch indices reach the device in one copy (epoch_steps), not one per
    step: a blocking copy makes the host wait for the GPU. On CUDA (LINESIDE_TEST_DEVICE=cuda)
    every batch after an epoch's first, and its forward pass, is made under
    torch.cuda.set_sync_debug_mode("error"), where any copy or read that waits for the GPU
    raises. `full` makes batches from the images on the device (batch augmentation forced
    on the CPU), `finetune` from the bank of frozen activations."""
    import contextlib

    from lineside.train import loop

    monkeypatch.setenv("LINESIDE_BATCH_AUGMENT", "1")
    calls = {"epochs": 0, "copies": 0}
    real_steps, real_epoch = loop.epoch_steps, loop.train_one_epoch

    def counted_steps(*args):
        calls["copies"] += 1
        return real_steps(*args)

    @contextlib.contextmanager
    def no_sync(on: bool):
        if on:
            torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            if on:
                torch.cuda.set_sync_debug_mode("default")

    def checked_epoch(forward, optimizer, batches, *args, **kw):
        calls["epochs"] += 1
        cuda = optimizer.param_groups[0]["params"][0].is_cuda
        steps = {"n": 0}

        def guarded():
            it = iter(batches)
            while True:
                with no_sync(cuda and steps["n"] > 0):
                    batch = next(it, None)
                if batch is None:
                    return
                yield batch

        def guarded_forward(x):
            with no_sync(cuda and steps["n"] > 0):
                out = forward(x)
            steps["n"] += 1
            return out

        return real_epoch(guarded_forward, optimizer, guarded(), *args, **kw)

    monkeypatch.setattr(loop, "epoch_steps", counted_steps)
    monkeypatch.setattr(loop, "train_one_epoch", checked_epoch)
    train_run(synth_dir, tmp_path, TrainConfig(**{**TINY, "strategy": strategy, "epochs": 3, "calibrate": "off"}),
              progress=False)
    assert calls["epochs"] == 3 and calls["copies"] == 3


def test_take_gathers_rows_and_keeps_pinned_images_pinned(test_device):
    """A batch of host images for a GPU run (a set too large for its memory) is gathered
    into pinned memory, so its copy to the GPU does not wait; plain indexing would give
    pageable memory. Pinning needs a CUDA driver: with LINESIDE_TEST_DEVICE=cuda the
    pinned case is checked, on the CPU the rows alone."""
    from lineside.train.loop import take

    images = torch.arange(5 * 2 * 2 * 3, dtype=torch.uint8).reshape(5, 2, 2, 3)
    at = torch.tensor([4, 0, 4, 2])
    pinned = test_device == "cuda"
    got = take(images.pin_memory() if pinned else images, at)
    assert torch.equal(got, images[at])
    assert got.is_pinned() == pinned


def test_class_weights_keep_a_rare_class_from_being_swallowed_by_the_common_one():
    """Imbalance (--balance loss, the default): with 20 times more images of one class
    (an OK class is most of what a line photographs) and classes that overlap, an
    unweighted head calls nearly everything the common class; the weighted head finds
    the rare class far more often and scores a better balanced accuracy on balanced
    held-out data."""
    from lineside.train.heads import fit_linear_head
    from lineside.train.loop import class_weights

    rng = np.random.default_rng(0)

    def draw(n_common, n_rare):
        x = np.concatenate([rng.normal(0, 1, (n_common, 8)), rng.normal(0.8, 1, (n_rare, 8))]).astype(np.float32)
        return torch.from_numpy(x), torch.from_numpy(np.array([0] * n_common + [1] * n_rare))

    x, y = draw(400, 20)
    x_test, y_test = draw(500, 500)
    recalls = {}
    for name, weight in (("none", None), ("loss", class_weights(np.bincount(y.numpy())))):
        head = torch.nn.Linear(8, 2)
        fit_linear_head(head, x, y, 1e-3, True, weight=weight)
        with torch.no_grad():
            pred = head(x_test).argmax(1)
        recalls[name] = [float((pred[y_test == c] == c).float().mean()) for c in (0, 1)]
    # measured: rare-class recall 0.44 unweighted, 0.81 weighted; balanced 0.72 against 0.85
    assert recalls["loss"][1] > recalls["none"][1] + 0.25 and recalls["loss"][0] > 0.75
    assert np.mean(recalls["loss"]) > np.mean(recalls["none"]) + 0.05


def test_layout_is_channels_last_on_the_cpu_and_nchw_on_cuda_unless_asked(monkeypatch):
    """Images and weights are channels_last on the CPU and NCHW on CUDA (PyTorch's own
    depthwise kernels instead of cuDNN's, which cost seconds to set up);
    LINESIDE_CHANNELS_LAST=1 or 0 sets the layout everywhere."""
    from lineside.train.data import in_layout, memory_format, to_tensor

    t = to_tensor(_images(2), torch.device("cpu"))
    assert memory_format() == torch.channels_last
    assert t.is_contiguous(memory_format=torch.channels_last) and t.dtype == torch.float32
    assert in_layout(t) is t                     # already in the layout: no copy
    assert memory_format("cuda") == torch.contiguous_format     # cuDNN's channels_last cold start (data.py)
    monkeypatch.setenv("LINESIDE_CHANNELS_LAST", "1")
    assert memory_format("cuda") == torch.channels_last
    monkeypatch.setenv("LINESIDE_CHANNELS_LAST", "0")
    assert memory_format() == torch.contiguous_format
    nchw = to_tensor(_images(2), torch.device("cpu"))
    assert nchw.is_contiguous() and not nchw.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(nchw, t)
