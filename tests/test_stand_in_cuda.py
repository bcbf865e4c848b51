"""Every training, scoring and study path with the model on a stand-in CUDA device
(tests/stand_in_cuda.py, one fresh process per job): a tensor on the CPU meeting one on the
device fails here, without a GPU, where it would fail on one. It checks where tensors live,
not what they hold; LINESIDE_TEST_DEVICE=cuda on a GPU machine runs the real thing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HELPER = Path(__file__).with_name("stand_in_cuda.py")
# Where a real CUDA device is, LINESIDE_TEST_DEVICE=cuda runs these paths for real.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a real CUDA device is here")


def _job(*args, expect_ok: bool = True) -> dict:
    done = subprocess.run([sys.executable, str(HELPER), *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    assert lines, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(lines[-1])
    if expect_ok:
        assert done.returncode == 0 and "error" not in result, json.dumps(result, indent=1)
    return result


def test_the_stand_in_refuses_what_cuda_refuses():
    """What the other tests rest on: a CPU tensor meeting a weight on the device fails, and so
    does numpy() of a tensor on the device."""
    r = _job("refuse")
    assert r["weight"] == r["on_device"] == "cuda:0"
    assert r["cpu_input"] == "FakeTensorDeviceMismatchError" and r["numpy"] == "TypeError"


def test_labels_left_on_the_cpu_are_caught_with_where(synth_dir, tmp_path, monkeypatch):
    """The stand-in finds a mistake of the kind it is for, and says where: each batch's labels
    handed to the loss on the CPU while the logits are on the device (STAND_IN_MUTANT)."""
    monkeypatch.setenv("STAND_IN_MUTANT", "labels-on-host")
    cfg = {"strategy": "full", "image_size": 64, "epochs": 1, "batch_size": 8, "calibrate": "off"}
    r = _job("train", synth_dir, tmp_path / "run", json.dumps(cfg), expect_ok=False)
    assert r["error"].startswith("FakeTensorDeviceMismatchError"), r
    assert any(at.startswith("train/loop.py") and "cross_entropy" in at for at in r["at"]), r


@pytest.mark.parametrize("options", [
    {"strategy": "full", "val_fraction": 0.25},                # batched augmentation, validation on the device
    {"strategy": "scratch", "val_fraction": 0.25},             # BatchNorm statistics recomputed
    {"strategy": "finetune"},                                  # the bank, the head, 3 out-of-fold fine-tunings
    {"strategy": "finetune", "unfreeze": "all", "val_fraction": 0.25},   # the head on the bank, then end to end
    {"strategy": "linear"},                                    # the bank, 5 out-of-fold heads on it
    {"strategy": "auto", "time_budget": 1e-9},                 # cross-validated heads; fine-tuning over budget
], ids=["full", "scratch", "finetune-out-of-fold", "finetune-all", "linear-out-of-fold", "auto-linear"])
def test_every_recipe_trains_calibrates_and_writes_its_run_on_the_device(synth_dir, tmp_path, options):
    cfg = dict({"image_size": 64, "epochs": 1, "batch_size": 8, "views": 2, "calibrate": "auto"}, **options)
    r = _job("train", synth_dir, tmp_path / "run", json.dumps(cfg))
    assert r["device"] == "cuda" and r["calibrated"]
    assert {"model.pt", "metrics.json", "history.csv", "config.yaml", "confusion_matrix.png"} <= set(r["written"])
    if options["strategy"] == "auto":
        assert r["strategy"] == "linear" and "over --time-budget" in r["reason"]


def test_a_run_scores_and_predicts_on_the_device(tiny_run, synth_test_dir):
    r = _job("eval", tiny_run[0], synth_test_dir)
    assert r["scored_on"] == ["cuda:0"] and r["n"] == 50 and r["label"]


@pytest.mark.parametrize("study", ["sample-size", "compare", "cv"])
def test_every_study_runs_on_the_device(synth_dir, tmp_path, study):
    r = _job("study", study, synth_dir, tmp_path / "study")
    assert r["written"]


@pytest.mark.parametrize("strategy", ["full", "finetune"])
def test_no_training_step_makes_the_host_wait_for_the_device(synth_dir, tmp_path, strategy):
    """Keep the GPU busy: within an epoch nothing reads a value back from the device, copies
    to the host or from pageable host memory, or synchronises, but the first step (waited for
    to be timed: first_step_seconds) and the epoch's summed loss, read once at the end. The
    stand-in records every such wait where it happens; `full` steps through the images on
    the device with the batch augmentation, `finetune` through its bank."""
    cfg = {"strategy": strategy, "image_size": 64, "epochs": 2, "batch_size": 8, "views": 2, "calibrate": "off",
           "val_fraction": 0.25}
    r = _job("steps", synth_dir, tmp_path / "run", json.dumps(cfg))
    assert len(r["steps"]) == 2 and min(r["steps"]) >= 4
    assert r["waits_between"] == []
    for waits in r["waits_in_epochs"]:
        assert [what for what, _ in waits] == ["synchronize", "__float__()"], waits


def test_a_value_read_back_in_every_step_is_caught(synth_dir, tmp_path, monkeypatch):
    """What the test above would see if each step read its loss (float(loss), as lineside's
    loop once did): a wait in every step."""
    monkeypatch.setenv("STAND_IN_MUTANT", "loss-read-each-step")
    cfg = {"strategy": "full", "image_size": 64, "epochs": 1, "batch_size": 8, "calibrate": "off"}
    r = _job("steps", synth_dir, tmp_path / "run", json.dumps(cfg))
    assert len(r["waits_between"]) == r["steps"][0] - 2
    assert all(waits == [["__float__()", waits[0][1]]] for waits in r["waits_between"])


@pytest.mark.parametrize("strategy", ["full", "finetune"])
def test_validation_runs_only_convolutions_that_training_set_up(synth_dir, tmp_path, strategy):
    """On CUDA every new convolution shape, dtype and layout is a cuDNN plan to set up (seconds
    for a network of depthwise convolutions): validation runs in the training's batch shape,
    mixed precision and layout, so it brings none of its own. The stand-in records each
    convolution's (shapes, stride, groups, dtype autocast would give, layout) by phase."""
    cfg = {"strategy": strategy, "image_size": 64, "epochs": 2, "batch_size": 8, "views": 2, "calibrate": "auto",
           "val_fraction": 0.25}
    r = _job("kernels", synth_dir, tmp_path / "run", json.dumps(cfg))
    assert r["training"] > 0 and r["validation"] > 0, r
    assert r["validation_not_in_training"] == 0, r

