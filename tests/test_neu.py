"""A quick real-data check on NEU steel-surface defects (skips when the dataset is absent).

The accuracy benchmark lives in benchmarks/fewshot.py; this only proves the
pipeline works on real grayscale industrial images."""

import numpy as np

from lineside.dataset import draw_per_class, load_image_set
from lineside.train.config import TrainConfig
from lineside.train.evaluate import evaluate_run
from lineside.train.run import train_run


def test_linear_on_five_neu_images_per_class(neu_dir, tmp_path):
    images = load_image_set(neu_dir)
    assert images.counts() == {c: 300 for c in images.classes} and len(images.classes) == 6
    drawn, rest = draw_per_class(images.targets, 5, seed=0)
    held_out = np.random.default_rng(0).choice(rest, size=120, replace=False)
    train_csv = images.write_manifest(tmp_path / "train.csv", drawn)
    test_csv = images.write_manifest(tmp_path / "test.csv", held_out)
    cfg = TrainConfig(strategy="linear", image_size=128, views=2)
    train_run(train_csv, tmp_path / "run", cfg, progress=False)
    report = evaluate_run(tmp_path / "run", test_csv, progress=False)
    # frozen ImageNet features separate these textures far above chance (1/6)
    assert report["balanced_accuracy"] >= 0.8, report["per_class"]
