"""Torch-free core: input spec, image reading, datasets, metrics, synthetic data."""

import json

import cv2
import numpy as np
import pytest

from lineside.dataset import draw_per_class, load_image_set, scores_over_draws, stratified_split
from lineside.errors import LinesideError
from lineside.images import BadImage, read_image
from lineside.metrics import classification_report
from lineside.spec import InputSpec, resize_to_spec
from lineside.synth import CLASSES, write_dataset


def test_input_spec_round_trips_through_json():
    spec = InputSpec(96, 128, interpolation="linear", mean=(1, 2, 3), std=(4, 5, 6))
    again = InputSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert again.size == (96, 128)


@pytest.mark.parametrize("bad", [
    {"height": 4, "width": 64},
    {"height": 64, "width": 64, "interpolation": "lanczos9"},
    {"height": 64, "width": 64, "std": (1, 0, 1)},
    {"height": 64, "width": 64, "colour": "BGR"},
])
def test_input_spec_rejects_bad_values(bad):
    with pytest.raises(LinesideError):
        InputSpec.from_dict(bad)


def test_resize_to_spec_gives_spec_size():
    img = np.zeros((50, 70, 3), np.uint8)
    assert resize_to_spec(img, InputSpec(32, 40)).shape == (32, 40, 3)
    with pytest.raises(LinesideError):
        resize_to_spec(np.zeros((5, 5), np.uint8), InputSpec(32, 32))


def test_read_image_gray_and_16bit_become_rgb_uint8(tmp_path):
    gray = (np.arange(64 * 48) % 256).astype(np.uint8).reshape(48, 64)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    cv2.imwrite(str(tmp_path / "w.png"), (gray.astype(np.uint16) * 256))
    for name in ("g.png", "w.png"):
        img = read_image(tmp_path / name)
        assert img.shape == (48, 64, 3) and img.dtype == np.uint8
        assert np.array_equal(img[:, :, 0], gray) and np.array_equal(img[:, :, 2], gray)


def test_read_image_reports_corrupt_and_empty_files_by_name(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(BadImage, match="broken.jpg"):
        read_image(tmp_path / "broken.jpg")
    with pytest.raises(BadImage, match="empty.png.*empty"):
        read_image(tmp_path / "empty.png")
    with pytest.raises(BadImage, match="missing.png"):
        read_image(tmp_path / "missing.png")


def _make_folder(root, counts):
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            cv2.imwrite(str(root / name / f"{i}.png"), np.full((8, 8, 3), i * 10, np.uint8))


def test_folder_dataset_scans_classes_sorted(tmp_path):
    _make_folder(tmp_path, {"ok": 3, "dent": 2})
    ds = load_image_set(tmp_path)
    assert ds.classes == ("dent", "ok")
    assert ds.counts() == {"dent": 2, "ok": 3}
    assert len(ds.fingerprint()) == 16


@pytest.mark.parametrize("counts,message", [
    ({"ok": 3, "dent": 0}, "dent.*no images"),
    ({"ok": 3}, "at least 2 classes"),
    ({}, "no class folders"),
])
def test_folder_dataset_errors_name_the_problem(tmp_path, counts, message):
    _make_folder(tmp_path, counts)
    with pytest.raises(LinesideError, match=message):
        load_image_set(tmp_path)


def test_dataset_against_model_labels_rejects_unknown_class(tmp_path):
    _make_folder(tmp_path, {"ok": 1, "rust": 1})
    with pytest.raises(LinesideError, match="rust"):
        load_image_set(tmp_path, classes=["ok", "dent"])


def test_csv_manifest(tmp_path):
    _make_folder(tmp_path / "imgs", {"a": 2, "b": 2})
    (tmp_path / "m.csv").write_text("path,label\nimgs/a/0.png,ok\nimgs/a/1.png,ok\nimgs/b/0.png,ng\n")
    ds = load_image_set(tmp_path / "m.csv")
    assert ds.classes == ("ng", "ok") and len(ds) == 3
    (tmp_path / "bad.csv").write_text("imgs/a/0.png,ok\nimgs/nope.png,ng\n")
    with pytest.raises(LinesideError, match="bad.csv:2.*nope.png"):
        load_image_set(tmp_path / "bad.csv")


def test_stratified_split_is_disjoint_and_covers_every_class():
    targets = np.repeat([0, 1, 2], [10, 4, 2])
    train, val = stratified_split(targets, 0.25, seed=3)
    assert not set(train) & set(val)
    assert sorted(np.concatenate([train, val])) == list(range(len(targets)))
    for c in range(3):
        assert (targets[train] == c).any() and (targets[val] == c).any()
    again = stratified_split(targets, 0.25, seed=3)
    assert np.array_equal(again[0], train)


def test_draw_per_class_draws_k_each_and_holds_out_the_rest():
    targets = np.repeat([0, 1], [6, 9])
    drawn, rest = draw_per_class(targets, 4, seed=0)
    assert np.bincount(targets[drawn]).tolist() == [4, 4]
    assert not set(drawn) & set(rest) and len(drawn) + len(rest) == 15
    with pytest.raises(LinesideError):
        draw_per_class(targets, 6, seed=0)


def test_classification_report_by_hand():
    r = classification_report([0, 0, 0, 1, 2], [0, 0, 1, 1, 1], ["a", "b", "c"])
    assert r["accuracy"] == pytest.approx(3 / 5)
    assert r["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert r["per_class"]["b"]["precision"] == pytest.approx(1 / 3)
    assert r["per_class"]["a"]["support"] == 3
    assert r["confusion_matrix"] == [[2, 1, 0], [0, 1, 0], [0, 1, 0]]


def test_synthetic_dataset_is_reproducible(tmp_path):
    a = write_dataset(tmp_path / "a", per_class=2, size=48, seed=5)
    write_dataset(tmp_path / "b", per_class=2, size=48, seed=5)
    write_dataset(tmp_path / "c", per_class=2, size=48, seed=6)
    assert a == {c: 2 for c in CLASSES}
    same = read_image(tmp_path / "a" / "hat" / "hat_0001.png")
    assert np.array_equal(same, read_image(tmp_path / "b" / "hat" / "hat_0001.png"))
    assert not np.array_equal(same, read_image(tmp_path / "c" / "hat" / "hat_0001.png"))
    with pytest.raises(LinesideError, match="unknown synthetic class"):
        write_dataset(tmp_path / "d", classes=("hat", "bolt"))


def test_scores_over_draws_scores_each_draw_on_the_rest():
    targets = [0] * 10 + [1] * 10 + [2] * 10
    y = np.array(targets)
    seen = []

    def perfect(drawn, rest):
        seen.append((set(drawn.tolist()), set(rest.tolist())))
        return y[rest]

    assert scores_over_draws(targets, 3, 2, perfect) == [100.0, 100.0]
    assert all(not (d & r) and len(d) == 9 and len(d | r) == 30 for d, r in seen)
    assert seen[0][0] != seen[1][0]                      # each seed its own draw
    always_zero = scores_over_draws(targets, 3, 1, lambda d, r: np.zeros(len(r), int))
    assert always_zero == [pytest.approx(100 / 3)]


def test_a_manifest_saved_by_excel_with_a_byte_order_mark_reads(synth_dir, tmp_path):
    from lineside.dataset import load_image_set

    images = load_image_set(synth_dir)
    picked = [0, 1, len(images) - 2, len(images) - 1]    # two classes
    manifest = images.write_manifest(tmp_path / "m.csv", picked)
    manifest.write_bytes(b"\xef\xbb\xbf" + manifest.read_bytes())
    again = load_image_set(manifest)
    assert [p.name for p in again.paths] == [images.paths[i].name for i in picked]


def test_model_keys_name_their_runtime_precision_and_file_in_one_place():
    from lineside.bundles import ModelKey

    for runtime in ("openvino", "onnxruntime"):
        for precision in ("fp32", "int8"):
            k = ModelKey(runtime, precision)
            assert ModelKey.parse(k.key) == k
            assert k.file.startswith(f"model_{precision}.")
    assert ModelKey("onnxruntime", "int8").key == "onnx_int8" and ModelKey("openvino", "fp32").file == "model_fp32.xml"
    assert ModelKey.parse("tensorrt_fp16") is None and ModelKey.parse("onnx") is None


def test_trained_info_round_trips_and_reads_wrong_types_as_missing():
    from lineside.runs import TrainedInfo

    classifier = TrainedInfo(strategy="linear", weights="imagenet", data_fingerprint="ab", lineside_version="0.1.0",
                             val_balanced_accuracy=None, reject_below=0.42)
    assert TrainedInfo.from_dict(classifier.to_dict()) == classifier
    assert list(classifier.to_dict()) == ["strategy", "weights", "data_fingerprint", "lineside_version",
                                          "val_balanced_accuracy", "reject_below"]
    anomaly = TrainedInfo(strategy="anomaly", task="anomaly", ok_classes=("good", "ok"), threshold=1.5)
    assert TrainedInfo.from_dict(anomaly.to_dict()) == anomaly and anomaly.good_classes == ["good", "ok"]
    odd = TrainedInfo.from_dict({"reject_below": "0.5", "ok_classes": [1, 2], "strategy": True, "threshold": True})
    assert odd == TrainedInfo() and odd.good_classes == ["good"]
    assert TrainedInfo.from_dict(None) == TrainedInfo()
