"""The command line: thin commands, one-line errors, JSON for scripts, no torch for --help."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from lineside.cli import main
from lineside.train.data import layout


@pytest.fixture()
def runner():
    return CliRunner()


def test_data_synth_writes_class_folders(runner, tmp_path):
    res = runner.invoke(main, ["data", "synth", str(tmp_path / "d"), "--per-class", "2", "--size", "40"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["card", "cube", "hat", "screw", "torch"]
    assert len(list((tmp_path / "d" / "hat").glob("*.png"))) == 2


def test_list_backbones(runner):
    res = runner.invoke(main, ["train", "--list-backbones"])
    assert res.exit_code == 0
    assert "efficientnet_lite0" in res.output and "resnet18" in res.output


def test_train_eval_predict_json(runner, synth_dir, synth_test_dir, tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(main, ["train", str(synth_dir), "--out", str(out), "--strategy", "linear",
                               "--image-size", "64", "--views", "2", "--quiet", "--json"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output)
    assert metrics["strategy"] == "linear"
    on_cpu = metrics["device"] == "cpu"           # LINESIDE_TEST_DEVICE=cuda trains on the GPU
    assert (metrics["host"]["gpu"] is None) == on_cpu                                    # what trained it
    assert metrics["host"]["layout"] == layout(metrics["device"])      # NCHW on CUDA
    again = runner.invoke(main, ["train", str(synth_dir), "--out", str(out), "--quiet"])
    assert again.exit_code == 2 and "--force" in again.output

    res = runner.invoke(main, ["eval", str(out), str(synth_test_dir), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    for key in ("balanced_accuracy", "accuracy", "labels", "per_class", "confusion_matrix", "n"):
        assert key in report
    assert set(report["per_class"]["hat"]) == {"precision", "recall", "f1", "support"}
    assert report["n"] == 50
    from lineside.train import trainer
    assert report["device"] == trainer.pick_device("auto").type      # a run scores on CUDA when present
    res = runner.invoke(main, ["eval", str(out), str(synth_test_dir), "--device", "cpu", "--json"])
    on_cpu = json.loads(res.output)
    assert on_cpu["device"] == "cpu" and on_cpu["confusion_matrix"] == report["confusion_matrix"]
    figures = tmp_path / "figures"
    res = runner.invoke(main, ["eval", str(out), str(synth_test_dir), "--device", "cpu", "--out", str(figures)])
    assert res.exit_code == 0 and "confusion_matrix.png" in res.output
    import cv2

    cm = cv2.imread(str(figures / "confusion_matrix.png"))
    assert cm is not None and min(cm.shape[:2]) > 200
    wrong = sorted(figures.glob("wrong-*.png"))
    assert len(wrong) == min(60, len(report["misclassified"]))
    page = (figures / "index.html").read_text()
    assert "confusion_matrix.png" in page and all(w.name in page for w in wrong)
    assert json.loads((figures / "report.json").read_text())["confusion_matrix"] == report["confusion_matrix"]
    res = runner.invoke(main, ["eval", str(out), str(synth_test_dir), "--device", "NPU"])
    assert res.exit_code == 2 and res.output.startswith("error: --device NPU: a training run scores in PyTorch")

    image = sorted((synth_test_dir / "screw").glob("*.png"))[0]
    res = runner.invoke(main, ["predict", str(out), str(image), "--json"])
    assert res.exit_code == 0, res.output
    (pred,) = json.loads(res.output)
    assert pred["label"] in report["labels"]
    assert set(pred["probabilities"]) == set(report["labels"])

    res = runner.invoke(main, ["predict", str(out), str(image)])
    assert res.exit_code == 0 and pred["label"] in res.output

    res = runner.invoke(main, ["predict", str(out), str(synth_test_dir / "hat"), "--json"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.output)) == 10


@pytest.mark.parametrize("args,needle", [
    (["train", "{tmp}/nowhere", "--out", "{tmp}/r"], "nowhere: no such dataset"),
    (["eval", "{tmp}/norun", "{tmp}"], "norun"),
    (["predict", "{tmp}/norun", "{tmp}/x.png"], "norun"),
    (["train", "{tmp}", "--out", "{tmp}/r", "--unfreeze", "lots"], "--unfreeze"),
    (["train", "{tmp}/empty", "--task", "anomaly", "--out", "{tmp}/r"], "no class folders"),
    (["study", "sample-size", "{tmp}/empty", "--out", "{tmp}/r"], "no class folders"),
    (["study", "sample-size", "{tmp}/empty", "--task", "anomaly", "--out", "{tmp}/r"], "no class folders"),
    (["study", "compare", "{tmp}/empty", "--out", "{tmp}/r"], "no class folders"),
])
def test_errors_are_one_line_with_exit_code_2(runner, tmp_path, args, needle):
    (tmp_path / "empty").mkdir()
    res = runner.invoke(main, [a.format(tmp=tmp_path) for a in args])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.output
    assert not (tmp_path / "r").exists()          # a command that failed on its input leaves no --out behind


def test_the_gpu_running_out_of_memory_is_one_line_that_names_the_options(runner, synth_dir, tmp_path, monkeypatch):
    """CUDA's out-of-memory error (raised here by a stand-in training) becomes one line
    with exit status 2: how much more was asked for and the options that need less
    memory, not PyTorch's traceback; any other error still raises."""
    import torch

    from lineside.train import run as train_run_module

    def fails(*args, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                          "capacity of 5.79 GiB of which 1.12 GiB is free. Of the allocated ...")

    monkeypatch.setattr(train_run_module, "train_run", fails)
    res = runner.invoke(main, ["train", str(synth_dir), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "ran out of memory" in lines[0], res.output
    assert "2.00 GiB more" in lines[0] and "--batch-size" in lines[0] and "--device cpu" in lines[0]

    def broken(*args, **kw):
        raise RuntimeError("something else")

    monkeypatch.setattr(train_run_module, "train_run", broken)
    res = runner.invoke(main, ["train", str(synth_dir), "--out", str(tmp_path / "r2")])
    assert res.exit_code != 2 and isinstance(res.exception, RuntimeError)


def test_predict_names_a_corrupt_image(runner, tiny_run, tmp_path):
    run, _ = tiny_run
    (tmp_path / "bad.png").write_bytes(b"garbage")
    res = runner.invoke(main, ["predict", str(run), str(tmp_path / "bad.png")])
    assert res.exit_code == 2 and "bad.png" in res.output


def test_help_and_core_never_import_torch():
    code = (
        "import sys\n"
        "from lineside.cli import main\n"
        "import lineside.runtime, lineside.dataset, lineside.metrics, lineside.synth\n"
        "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'CLEAN')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("CLEAN")


def test_every_run_option_is_a_field_of_run_options_by_the_same_name():
    """`lineside run` builds its RunOptions from its parameters by name: a field the CLI
    has no option for (or names otherwise) would silently keep its default."""
    from dataclasses import fields

    from lineside.commands.run import run_cmd
    from lineside.runtime.app import RunOptions

    params = {p.name for p in run_cmd.params}
    assert {f.name for f in fields(RunOptions)} - params == {"log", "status"}    # from --log and --quiet/--json
    ctx = run_cmd.make_context("run", ["bundle", "--source", "0", "--pace", "5", "--log", "none", "--mqtt-queue",
                                       "7", "--http-host", "box.local"])
    options = RunOptions.from_params(ctx.params)
    assert (options.pace, options.log, options.mqtt_queue, options.http_hosts) == (5.0, None, 7, ("box.local",))
    assert options.status and options.save_when == "ng,unknown"        # defaults as the CLI gives them
    assert not RunOptions.from_params(run_cmd.make_context("run", ["b", "--source", "0", "--json"]).params).status


def test_the_typical_flow_in_the_top_level_help_names_real_commands_and_options(runner):
    """Every line of `lineside --help`'s flow parses: its command exists and each --option
    it gives is one of that command's (the first thing a newcomer copies)."""
    res = runner.invoke(main, ["--help"])
    assert res.exit_code == 0
    flow = [line.split("#")[0].split() for line in res.output.splitlines() if line.strip().startswith("lineside ")]
    assert len(flow) >= 6 and {"train", "export", "run"} <= {words[1] for words in flow}
    for words in flow:
        command = main
        for word in words[1:]:
            if word in getattr(command, "commands", {}):
                command = command.commands[word]
        assert command is not main, words
        names = {name for p in command.params for name in p.opts}
        assert {w for w in words if w.startswith("--")} <= names, words


@pytest.mark.parametrize("field,value,needle", [
    ("save_when", "ng,foo", "--save-when: foo is not one of"),
    ("capture_per_hour", 0, "--capture-per-hour: must be positive"),
    ("save_max_mb", 0, "--save-max-mb must be positive"),
])
def test_save_options_are_checked_with_or_without_save(field, value, needle):
    """A typo in --save-when is an error even before --save is added (it did nothing then)."""
    from lineside.errors import LinesideError
    from lineside.runtime.app import RunOptions

    with pytest.raises(LinesideError, match=needle):
        RunOptions(source="0", **{field: value})
    with pytest.raises(LinesideError, match=needle):
        RunOptions(source="0", save_dir="saved", **{field: value})


def test_a_training_run_given_to_run_says_to_export_it_first(tiny_run, tmp_path):
    from lineside.errors import LinesideError
    from lineside.runtime.model import open_model

    with pytest.raises(LinesideError, match="a training run, not a bundle .lineside export"):
        open_model(tiny_run[0])
