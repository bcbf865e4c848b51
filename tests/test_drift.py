"""Drift alarms: the bundle carries its training images' statistics; on the box a rolling
window raises a drift event when brightness (or contrast, or confidence) moves away,
within one window, and never over 10,000 frames of an unchanged stream."""

import json
import sqlite3

import cv2
import numpy as np
import pytest

from lineside.errors import LinesideError
from lineside.runtime.app import RunOptions, run_app
from lineside.runtime.drift import DriftMonitor, build_reference, check_reference, image_stats
from lineside.runtime.model import open_model


def _gamma(images, g):
    return ((images / 255.0) ** g * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def training_images(synth_dir):
    return np.stack([cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted(synth_dir.rglob("*.png"))])


def test_no_alarm_on_10000_unchanged_frames_and_an_alarm_within_a_window_after_a_shift(training_images):
    ref = check_reference(build_reference(training_images, None, "test"), "test")
    events = []
    monitor = DriftMonitor(ref, lambda kind, detail: events.append((kind, detail)), window=300)
    rng = np.random.default_rng(0)
    b, c = image_stats(training_images)
    for i in np.repeat(rng.integers(0, len(b), 10_000 // 3 + 1), 3)[:10_000]:     # each part held 3 frames
        monitor.add(b[i], c[i], 0.9)
    assert events == [] and monitor.frames == 10_000
    gb, gc = image_stats(_gamma(training_images, 0.7))                            # the light changed
    for k, i in enumerate(np.repeat(rng.integers(0, len(gb), 200), 3)):
        monitor.add(gb[i], gc[i], 0.9)
        if events:
            break
    assert events and events[0][0] == "drift" and events[0][1].startswith("brightness: mean")
    assert k < 300 + 2 * 30                             # within a window and two evaluations (documented)
    for i in np.repeat(rng.integers(0, len(b), 200), 3):                          # and back
        monitor.add(b[i], c[i], 0.9)
    assert [k for k, _ in events].count("drift_cleared") >= 1


def test_a_malformed_reference_is_one_line():
    with pytest.raises(LinesideError, match="drift_reference is malformed"):
        check_reference({"schema": 1, "stats": {"brightness": {"edges": [3, 1], "shares": [1, 0, 0],
                                                               "mean": 1, "sd": 1}}}, "bundle.json")
    assert check_reference(None, "x") is None


def test_the_station_raises_a_drift_event_when_the_light_changes(tiny_bundle, synth_test_dir, tmp_path):
    from test_products import Frames

    bundle, _ = tiny_bundle
    doc = json.loads((bundle / "bundle.json").read_text())
    assert set(doc["drift_reference"]["stats"]) >= {"brightness", "contrast"}
    images = [cv2.imread(str(p)) for p in sorted(synth_test_dir.rglob("*.png"))]
    darker = [_gamma(im, 1.6) for im in images]

    class Shift(Frames):
        def read(self):
            self.i += 1
            if self.i > 600:
                return None, ""
            pool = self.images if self.i <= 300 else darker
            return pool[self.i % len(pool)], f"f{self.i}"

    log = tmp_path / "log.sqlite"
    model = open_model(bundle, backend="openvino")
    summary = run_app(model, RunOptions(source=str(tmp_path), log=str(log), drift_window=120),
                      opener=lambda info: Shift(images, None))
    with sqlite3.connect(log) as con:
        drift = con.execute("SELECT detail FROM events WHERE kind = 'drift'").fetchall()
    assert summary["frames"] == summary["logged"] == 600
    assert drift and summary["drift"]["alarms"] >= 1 and "brightness" in summary["drift"]["alarmed"]
    no = run_app(model, RunOptions(source=str(tmp_path), log=None, drift=False),
                 opener=lambda info: Shift(images, None))
    assert "drift" not in no


def test_the_unknown_rate_is_watched_against_the_out_of_fold_estimate(training_images):
    doc = build_reference(training_images, np.r_[np.full(95, 0.9), np.full(5, 0.4)], "test", reject_below=0.5)
    assert doc["unknown_rate"]["expected"] == 0.05
    events = []
    monitor = DriftMonitor(check_reference(doc, "x"), lambda k, d: events.append((k, d)), window=300)
    b, c = image_stats(training_images)
    rng = np.random.default_rng(1)
    for k in range(3000):                               # 5% unknown, as expected: no alarm
        monitor.add(b[k % len(b)], c[k % len(c)], 0.9, rng.random() < 0.05)
    assert events == []
    for k in range(400):                                # a third of the parts unknown now
        monitor.add(b[k % len(b)], c[k % len(c)], 0.9, rng.random() < 0.33)
    assert events and events[0][1].startswith("unknown rate:")
    assert "unknown_rate" in monitor.summary()["alarmed"]
