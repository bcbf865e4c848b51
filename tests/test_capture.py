"""The frames worth labelling, kept on their own (--save-when worth): unknowns, frames near
the decision and a few confident ones at random, within an hourly quota; the review page
lists them first and a reviewed frame goes into a training set with its provenance."""


import pytest

from lineside.dataset import load_image_set
from lineside.runtime.app import RunOptions, run_app
from lineside.runtime.model import open_model
from lineside.runtime.records import DecisionRow, SavePolicy
from lineside.runtime.review import ReviewStore


def _row(ts, label="ok", probs=None, confidence=0.97):
    return DecisionRow(ts, 1, "s", "", label, confidence, label, None, label, probs or {"ok": 0.97, "ng": 0.03},
                       [], 1.0, 1.0, "x")


def test_the_policy_keeps_the_hard_cases_and_a_few_easy_ones_within_the_quota(tmp_path):
    policy = SavePolicy(tmp_path, ("worth",), per_hour=40, reject_below=0.6)
    t0 = 1_000_000.0
    assert policy.wants(_row(t0, "unknown", confidence=0.4)) and True
    near = _row(t0, probs={"ok": 0.55, "ng": 0.45}, confidence=0.55)
    assert policy.wants(near) and near.capture == "near_threshold"
    low = _row(t0, probs={"ok": 0.65, "ng": 0.10, "x": 0.25}, confidence=0.65)     # just above --reject-below
    assert policy.wants(low) and low.capture == "near_threshold"
    confident = [_row(t0 + i * 0.01) for i in range(3000)]
    kept = [r for r in confident if policy.wants(r)]
    assert kept and {r.capture for r in kept} == {"random"} and len(kept) == 10    # at most a quarter of 40
    hard = [_row(t0 + 10 + i, "unknown", confidence=0.3) for i in range(100)]
    assert sum(policy.wants(r) for r in hard) == 40 - 3 - 10                       # the hour's quota
    later = _row(t0 + 3601 + 200, "unknown", confidence=0.3)                          # an hour on: room again
    assert policy.wants(later) and later.capture == "unknown"
    with pytest.raises(Exception, match="--capture-per-hour"):
        SavePolicy(tmp_path, ("worth",), per_hour=0)


def test_captured_frames_come_first_and_go_to_training_with_provenance(tiny_bundle, synth_test_dir, tmp_path):
    model = open_model(tiny_bundle[0], backend="openvino")
    log, save = tmp_path / "log.sqlite", tmp_path / "saved"
    summary = run_app(model, RunOptions(source=str(synth_test_dir), log=str(log), save_dir=save, save_when="worth",
                                        reject_below=0.99, capture_per_hour=15, station="line3-st7"))
    assert 0 < summary["saved"] <= 15
    store = ReviewStore(log, save, tmp_path / "reviewed")
    items = store.items(verdict="worth")
    assert len(items) == summary["saved"] and all(i["capture"] for i in items)
    first = items[0]
    entry = store.review(first["id"], model.labels[0])
    assert entry["station"] == "line3-st7" and entry["model_sha256"] == model.checksum
    assert entry["capture"] == first["capture"]
    store.review(items[1]["id"], model.labels[1])
    dataset = load_image_set(tmp_path / "reviewed" / "manifest.csv")
    assert len(dataset) == 2 and set(dataset.classes) == {model.labels[0], model.labels[1]}


@pytest.mark.parametrize("log_name", ["log.sqlite", "log.jsonl"])
def test_a_frame_kept_after_its_decision_is_named_in_the_log(tmp_path, log_name):
    """A shadow disagreement: the frame is saved after the line's row went to the log, and
    the log then names the file and why; not when the quota is spent or the frame was saved."""
    import json
    import sqlite3

    import numpy as np

    from lineside.runtime.records import Recorder

    log = tmp_path / log_name
    recorder = Recorder(log, {"source": "s"}, SavePolicy(tmp_path / "saved", ("worth",), per_hour=1))
    image = np.zeros((32, 32, 3), np.uint8)
    from dataclasses import replace

    rows = [replace(_row(1000.0 + i), frame=i + 1) for i in range(3)]     # each frame once in a run
    for row in rows:
        recorder.decision(row)
    assert recorder.keep(rows[0], image, "disagreement")
    assert not recorder.keep(rows[1], image, "disagreement")          # the hour's quota of 1 is spent
    recorder.close({})
    if log_name.endswith(".sqlite"):
        with sqlite3.connect(log) as con:
            kept = con.execute("SELECT saved, capture FROM decisions WHERE saved IS NOT NULL").fetchall()
    else:
        kept = [(x["saved"], x["capture"]) for x in map(json.loads, log.read_text().splitlines())
                if x["type"] == "capture"]
    assert len(kept) == 1 and kept[0][1] == "disagreement" and (tmp_path / "saved" / kept[0][0]).is_file()
    assert rows[0].saved is None and rows[0].capture is None             # the line's own row was not touched


def test_a_clock_set_back_does_not_stop_the_capture_for_hours(tmp_path):
    """The quota counts the frames kept in the last hour by their timestamps; a clock set
    back by a day (an NTP correction on a box that booted with a wrong date) would have
    left the hour full until the clock caught up again."""
    policy = SavePolicy(tmp_path, ("worth",), per_hour=5)
    t0 = 2_000_000_000.0
    assert all(policy.wants(_row(t0 + i, "unknown", confidence=0.3)) for i in range(5))
    assert not policy.wants(_row(t0 + 10, "unknown", confidence=0.3))           # the hour is full
    assert policy.wants(_row(t0 - 86400, "unknown", confidence=0.3))            # a day back: room again
