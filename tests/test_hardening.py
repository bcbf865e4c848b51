"""Faults a hostile or careless user can cause: none may cost a logged decision, crash the
loop, or give more than one line of error."""

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from lineside.cli import main
from lineside.runtime.app import RunOptions, run_app
from lineside.runtime.model import open_model
from lineside.runtime.records import DecisionRow, Recorder
from lineside.text import printable, redact_url


@pytest.fixture(scope="module")
def model(tiny_bundle):
    bundle, _ = tiny_bundle
    return open_model(bundle, backend="openvino")


def _folder_with_a_latin1_name(src: Path, folder: Path) -> Path:
    folder.mkdir()
    pngs = sorted((src / "hat").glob("*.png"))[:5]
    for i, p in enumerate(pngs[:4]):
        (folder / f"{i}.png").write_bytes(p.read_bytes())
    # 'café.png' as Latin-1 bytes: not UTF-8, as names from a Windows share often are
    latin1 = os.path.join(os.fsencode(folder), b"caf\xe9.png")
    with open(latin1, "wb") as f:
        f.write(pngs[4].read_bytes())
    return folder


# --- 1. text that is not UTF-8 --------------------------------------------------------

def test_printable_keeps_the_raw_bytes_recoverable_and_encodes():
    name = os.fsdecode(b"caf\xe9.png")
    shown = printable(name)
    shown.encode("utf-8")
    assert shown == "caf\\xe9.png"
    printable("\ud800x").encode("utf-8")     # a lone surrogate that is no escaped byte
    assert printable("plain") == "plain" and printable(3) == "3"


@pytest.mark.parametrize("log_name", ["log.sqlite", "log.jsonl"])
def test_a_file_name_that_is_not_utf8_costs_no_decision(model, synth_test_dir, tmp_path, log_name):
    folder = _folder_with_a_latin1_name(synth_test_dir, tmp_path / "frames")
    log = tmp_path / log_name
    summary = run_app(model, RunOptions(source=str(folder), log=str(log)))
    assert summary["frames"] == summary["logged"] == 5
    assert summary["not_logged"] == summary["unwritable_rows"] == 0 and summary["exit_code"] == 0
    if log_name.endswith(".sqlite"):
        with sqlite3.connect(log) as con:
            origins = [r[0] for r in con.execute("SELECT origin FROM decisions")]
    else:
        origins = [json.loads(x)["origin"] for x in log.read_text().splitlines()
                   if json.loads(x)["type"] == "decision"]
    assert "caf\\xe9.png" in origins and len(origins) == 5


def test_run_cli_prints_a_summary_for_a_name_that_is_not_utf8(tiny_bundle, synth_test_dir, tmp_path):
    bundle, _ = tiny_bundle
    folder = _folder_with_a_latin1_name(synth_test_dir, tmp_path / "frames")
    result = CliRunner().invoke(main, ["run", str(bundle), "--source", str(folder), "--quiet", "--json",
                                       "--log", str(tmp_path / "log.sqlite")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["logged"] == 5


def _row(frame, **kw):
    fields = dict(ts=time.time(), frame=frame, source="s", origin="o", label="a", confidence=0.9, top="a",
                  verdict=None, decision=None, probabilities={"a": 0.9, "b": 0.1}, flags=[], latency_ms=1.0,
                  capture_to_decision_ms=2.0, model_sha256="x")
    fields.update(kw)
    return DecisionRow(**fields)


@pytest.mark.parametrize("log_name", ["log.sqlite", "log.jsonl"])
def test_a_row_the_log_cannot_hold_becomes_an_event_and_the_batch_is_written(tmp_path, log_name):
    path = tmp_path / log_name
    recorder = Recorder(path, {"source": "s"})
    for i in range(3):
        recorder.decision(_row(i))
    recorder.decision(_row(3, probabilities={"a": object()}))     # no log format can hold this
    for i in range(4, 7):
        recorder.decision(_row(i))
    recorder.close({})
    counts = recorder.counts()
    assert counts["logged"] == 6 and counts["unwritable_rows"] == 1 and counts["not_logged"] == 0
    if log_name.endswith(".sqlite"):
        with sqlite3.connect(path) as con:
            frames = [r[0] for r in con.execute("SELECT frame FROM decisions ORDER BY frame")]
            events = con.execute("SELECT kind, detail FROM events").fetchall()
    else:
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        frames = sorted(x["frame"] for x in lines if x["type"] == "decision")
        events = [(x["kind"], x["detail"]) for x in lines if x["type"] == "event"]
    assert frames == [0, 1, 2, 4, 5, 6]
    assert [k for k, _ in events] == ["row_unwritable"] and '"label": "a"' in events[0][1]


def test_redact_url_hides_passwords_only():
    assert redact_url("mqtt://plc:s3cret@broker:1883/a/b") == "mqtt://plc:***@broker:1883/a/b"
    assert redact_url("rtsp://cam:p%40ss@10.0.0.5/stream") == "rtsp://cam:***@10.0.0.5/stream"
    assert redact_url("rtsp://10.0.0.5/stream") == "rtsp://10.0.0.5/stream"
    assert "s3cret" not in redact_url("cannot open url source 'rtsp://u:s3cret@h/x' now")
    assert redact_url("/data/frames") == "/data/frames"


@pytest.mark.parametrize("url", ["mqtt://plc:s3cret@broker:abc/line", "mqtt://plc:s3cret@/line",
                                 "http://plc:s3cret@broker/line", "mqtt://plc:s3cret@broker/"])
def test_a_bad_mqtt_url_is_refused_without_its_password(url):
    from lineside.errors import LinesideError
    from lineside.runtime.mqtt import parse_mqtt_url

    with pytest.raises(LinesideError) as err:
        parse_mqtt_url(url)
    assert "s3cret" not in str(err.value) and "plc:***@" in str(err.value)


def test_a_camera_url_with_a_password_is_never_recorded_with_it():
    from lineside.runtime.sources import describe_source

    info = describe_source("rtsp://cam:s3cret@127.0.0.1:1/stream")
    assert info.text.endswith("s3cret@127.0.0.1:1/stream") and info.shown == "rtsp://cam:***@127.0.0.1:1/stream"
