import os
from pathlib import Path

import pytest

NEU = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "neu-det"
NEU = Path(os.environ.get("LINESIDE_NEU", NEU))

# The tests' own runs check no free space (a CI disk near full would add disk_low events to
# runs whose events are asserted); the test of that check sets it. Subprocesses inherit it.
os.environ["LINESIDE_DISK_LOW_MB"] = "0"

# Small and fast: the whole suite runs on two CPU cores in a few minutes.
TINY = dict(image_size=64, views=2, epochs=3, batch_size=16, calibrate="off")   # calibration: its own tests


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    from lineside.synth import write_dataset

    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, per_class=12, size=64, seed=1)
    return root


@pytest.fixture(scope="session")
def synth_test_dir(tmp_path_factory):
    from lineside.synth import write_dataset

    root = tmp_path_factory.mktemp("synth_test")
    write_dataset(root, per_class=10, size=64, seed=2)
    return root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, synth_dir):
    """One finetune run shared by the tests that only read a run."""
    from lineside.train.config import TrainConfig
    from lineside.train.run import train_run

    out = tmp_path_factory.mktemp("run")
    metrics = train_run(synth_dir, out, TrainConfig(strategy="finetune", val_fraction=0.25, **TINY), progress=False)
    return out, metrics


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run, tmp_path_factory):
    """The tiny run exported to an FP32 bundle (ONNX + OpenVINO)."""
    from lineside.export.bundle import export_bundle

    run, _ = tiny_run
    out = tmp_path_factory.mktemp("bundle")
    return out, export_bundle(run, out)


@pytest.fixture(scope="session")
def neu_dir():
    if not (NEU / "crazing").is_dir():
        pytest.skip(f"real dataset not found at {NEU}")
    return NEU


@pytest.fixture(autouse=True, scope="session")
def test_device():
    """LINESIDE_TEST_DEVICE=cuda (or cpu) makes every training in the tests that leaves
    --device at auto run there: `LINESIDE_TEST_DEVICE=cuda make test` on a GPU machine.
    Unset, auto means what it means for users (CUDA when present)."""
    wanted = os.environ.get("LINESIDE_TEST_DEVICE")
    if not wanted:
        yield None
        return
    import torch

    from lineside.train import trainer

    if wanted == "cuda" and not torch.cuda.is_available():
        pytest.exit("LINESIDE_TEST_DEVICE=cuda: no CUDA device here", returncode=2)
    original = trainer.pick_device
    trainer.pick_device = lambda name: original(wanted if name == "auto" else name)
    yield wanted
    trainer.pick_device = original


def pytest_runtest_logreport(report):
    """LINESIDE_TEST_FAILURES=FILE: each failure is appended to FILE as it happens (its test
    and the error's last line), so a run cut short on a borrowed GPU machine still says what
    failed. Written once, by the main process under pytest-xdist."""
    path = os.environ.get("LINESIDE_TEST_FAILURES")
    if not path or not report.failed or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    crash = getattr(report.longrepr, "reprcrash", None)
    lines = [ln for ln in (crash.message if crash else str(report.longrepr)).splitlines() if ln.strip()]
    with open(path, "a") as f:
        f.write(f"{report.nodeid} [{report.when}]: {lines[0] if lines else 'failed'}\n")
