import os
from pathlib import Path

import pytest

NEU = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "neu-det"
NEU = Path(os.environ.get("LINESIDE_NEU", NEU))

# Small and fast: the whole suite runs on two CPU cores in a few minutes.
TINY = dict(image_size=64, views=2, epochs=3, batch_size=16)


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
