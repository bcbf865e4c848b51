"""The camera loop: sources, the latest-frame slot, reconnects, decisions, the log, signals."""

import http.server
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lineside.cli import main
from lineside.errors import LinesideError
from lineside.runtime.app import RunOptions, run_app
from lineside.runtime.decide import Decider, parse_vote
from lineside.runtime.model import open_model
from lineside.runtime.sources import Capture, Closed, Frame, FrameSlot, SourceInfo, describe_source
from lineside.video import write_video


@pytest.fixture(scope="module")
def video(synth_test_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("video") / "parts.avi"
    info = write_video(synth_test_dir, out, size=(160, 120), hold=2)
    return out, info


@pytest.fixture(scope="module")
def model(tiny_bundle):
    bundle, _ = tiny_bundle
    return open_model(bundle, backend="openvino")


def _frame(i):
    return Frame(np.zeros((4, 4, 3), np.uint8), i, time.perf_counter(), 0.0)


# --- slot and capture ------------------------------------------------------------------

def test_slot_keeps_only_the_newest_frame_and_counts_drops():
    slot = FrameSlot()
    for i in range(5):
        slot.put(_frame(i))
    assert slot.get(timeout=0).index == 4 and slot.dropped == 4
    assert slot.get(timeout=0) is None
    slot.close()
    with pytest.raises(Closed):
        slot.get(timeout=1)


def test_blocking_slot_drops_nothing():
    slot, got = FrameSlot(block=True), []

    def producer():
        for i in range(200):
            slot.put(_frame(i))
        slot.close()

    t = threading.Thread(target=producer)
    t.start()
    try:
        while True:
            got.append(slot.get(timeout=5).index)
    except Closed:
        pass
    t.join()
    assert got == list(range(200)) and slot.dropped == 0


class FlakyCamera:
    """A live source that delivers 5 frames, dies, refuses two reconnects, then works again."""

    def __init__(self):
        self.opens = 0
        self.delivered = 0

    def __call__(self, info):
        self.opens += 1
        if self.opens in (2, 3):
            raise OSError("camera unplugged")
        cam, left = self, 5

        class Reader:
            fps = 30

            def read(self):
                nonlocal left
                if left == 0:
                    return None, ""
                left -= 1
                cam.delivered += 1
                return np.full((48, 64, 3), 100 + cam.delivered, np.uint8), ""

            def release(self):
                pass

        return Reader()


def test_a_source_that_dies_comes_back_and_the_gap_is_an_event():
    camera, events = FlakyCamera(), []
    slot, stop = FrameSlot(block=True), threading.Event()
    cap = Capture(SourceInfo("cam", "camera", True), slot, stop, opener=camera, backoff=(0.01, 0.05),
                  on_event=lambda kind, detail: events.append(kind), max_frames=12)
    cap.start()
    frames = []
    try:
        while True:
            f = slot.get(timeout=5)
            frames.append(int(f.image[0, 0, 0]))
    except Closed:
        pass
    cap.join(5)
    kinds = [k for k in events]
    assert kinds[:4] == ["source_lost", "source_unavailable", "source_unavailable", "source_back"]
    # every frame delivered is a real one from the camera: no stand-ins for the gap
    assert frames == [100 + i for i in range(1, 13)] and cap.stats.reconnects >= 1


def test_pacing_releases_at_camera_rate_and_reads_just_before_each_frame_is_due():
    """--pace replays a file like a camera: one frame per period, each read (decoded)
    shortly before it goes out rather than a whole period early, so decoding does not
    overlap the previous frame's inference."""
    reads = []

    class Reader:
        fps = None

        def read(self):
            if len(reads) == 12:
                return None, ""
            reads.append(time.perf_counter())
            return np.zeros((8, 8, 3), np.uint8), ""

        def release(self):
            pass

    period = 0.05
    slot, stop = FrameSlot(block=True), threading.Event()
    cap = Capture(SourceInfo("f.avi", "file", False), slot, stop, pace=1 / period, opener=lambda info: Reader())
    cap.start()
    released = []
    try:
        while True:
            released.append(slot.get(timeout=5).t_capture)
    except Closed:
        pass
    cap.join(5)
    assert len(released) == 12
    gaps = np.diff(released)
    assert abs(float(np.median(gaps)) - period) < period * 0.2
    lead = np.array(released[1:]) - np.array(reads[1:])      # read -> release, per frame
    assert float(np.median(lead)) < period / 2


def test_a_finite_source_is_not_reopened_on_failure(tmp_path):
    with pytest.raises(LinesideError, match="no such video file"):
        describe_source(str(tmp_path / "missing.mp4"))
    with pytest.raises(LinesideError, match="not a camera index"):
        describe_source(str(tmp_path / "nothing-here"))
    assert describe_source("0").kind == "camera" and describe_source("rtsp://h/s").live


# --- decisions ---------------------------------------------------------------------------

def test_reject_ok_classes_and_vote():
    d = Decider(["ok", "scratch", "dent"], reject_below=0.6, ok_classes=("ok",), vote=parse_vote("2/3"))
    first = d(np.array([0.9, 0.05, 0.05]))
    assert (first.label, first.verdict, first.decision) == ("ok", "OK", None)   # one vote of two
    second = d(np.array([0.1, 0.85, 0.05]))
    assert second.decision is None and second.verdict == "NG"
    third = d(np.array([0.1, 0.8, 0.1]))
    assert third.decision == "scratch"
    unsure = d(np.array([0.4, 0.35, 0.25]))
    assert unsure.label == "unknown" and unsure.top == "ok" and unsure.verdict == "NG"
    assert unsure.decision == "scratch"     # still 2 of the last 3: one unsure frame does not flip it
    d(np.array([0.3, 0.3, 0.4]))
    assert d(np.array([0.2, 0.5, 0.3])).decision == "unknown"   # unknown, unknown, unknown
    with pytest.raises(LinesideError, match="--vote"):
        parse_vote("5/3")


# --- the whole loop -----------------------------------------------------------------------

def _rows(db):
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT frame, label, probabilities, verdict FROM decisions ORDER BY frame").fetchall()
        events = [r[0] for r in con.execute("SELECT kind FROM events")]
        runs = con.execute("SELECT ended, summary FROM runs").fetchall()
    return rows, events, runs


def test_video_file_every_frame_decided_and_logged(model, video, tmp_path):
    path, info = video
    db = tmp_path / "log.sqlite"
    summary = run_app(model, RunOptions(source=str(path), log=str(db), ok_classes="card,cube"))
    assert summary["frames"] == info["frames"] == summary["logged"] and summary["dropped"] == 0
    rows, _, runs = _rows(db)
    assert [r[0] for r in rows] == list(range(1, info["frames"] + 1))
    probs = json.loads(rows[0][2])
    assert set(probs) == set(model.labels) and abs(sum(probs.values()) - 1) < 1e-3
    assert {r[3] for r in rows} <= {"OK", "NG"} and runs[0][0] is not None
    # the model sees the parts: most frames carry the label the video was made from
    labels = [r[1] for r in rows]
    truth = [lab for lab in info["labels"] for _ in range(2)]
    assert np.mean([a == b for a, b in zip(labels, truth)]) > 0.5


def test_folder_source_survives_a_corrupt_image(model, synth_test_dir, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, p in enumerate(sorted((synth_test_dir / "hat").glob("*.png"))[:4]):
        (folder / f"{i}.png").write_bytes(p.read_bytes())
    (folder / "2b.png").write_bytes(b"not an image")
    log = tmp_path / "log.jsonl"
    summary = run_app(model, RunOptions(source=str(folder), log=str(log)))
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert summary["frames"] == 4
    assert [x["type"] for x in lines].count("decision") == 4
    assert any(x["type"] == "event" and x["kind"] == "bad_image" and "2b.png" in x["detail"] for x in lines)
    assert lines[-1]["type"] == "end"


def test_save_cap_keeps_the_newest_frames(model, video, tmp_path):
    path, _ = video
    save = tmp_path / "saved"
    summary = run_app(model, RunOptions(source=str(path), log=None, save_dir=save, save_when="all",
                                        save_max_files=5, max_frames=12))
    assert summary["saved"] == 12 and len(list(save.glob("*.jpg"))) == 5


def test_a_full_save_disk_loses_no_decision_and_stops_nothing(model, video, tmp_path, monkeypatch):
    """Saving frames fails (no space left on that disk): every decision is still in the
    log, each failure is a save_failed event and a count, and the run ends normally."""
    import errno

    path, _ = video
    save, log = tmp_path / "saved", tmp_path / "log.sqlite"
    real = Path.write_bytes

    def full_disk(self, data):
        if self.parent == save:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    summary = run_app(model, RunOptions(source=str(path), log=str(log), save_dir=save, save_when="all",
                                        max_frames=20))
    db = sqlite3.connect(log)
    assert summary["frames"] == 20 and summary["logged"] == 20
    assert db.execute("SELECT COUNT(*) FROM decisions").fetchone()[0] == 20
    failed = db.execute("SELECT detail FROM events WHERE kind = 'save_failed'").fetchall()
    assert summary["saved"] == 0 and summary["save_failed"] == 20 == len(failed)
    assert "No space left" in failed[0][0] and str(save) in failed[0][0]


def test_save_housekeeping_deletes_only_the_frames_lineside_saved(model, video, tmp_path):
    path, _ = video
    save = tmp_path / "saved"
    save.mkdir()
    mine = [save / f"operator_{i}.jpg" for i in range(5)] + [save / "20240101-120000_000000001_ok.jpg"]
    for f in mine:
        f.write_bytes(b"not lineside's")
    summary = run_app(model, RunOptions(source=str(path), log=None, save_dir=save, save_when="all",
                                        save_max_files=3, max_frames=8))
    assert summary["saved"] == 8 and all(f.exists() for f in mine)
    assert len(list(save.glob("lineside_*.jpg"))) == 3


def test_save_inside_a_folder_source_is_refused(model, synth_test_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(synth_test_dir, src)
    for save in (src, src / "review"):
        with pytest.raises(LinesideError, match="--save .*inside the --source folder"):
            run_app(model, RunOptions(source=str(src), log=None, save_dir=save, save_when="all"))
    assert not (src / "review").exists()


def test_roi_outside_the_frame_is_a_clear_error(model, video):
    path, _ = video
    with pytest.raises(LinesideError, match="--roi"):
        run_app(model, RunOptions(source=str(path), log=None, roi="100,100,200,200"))


def test_black_and_frozen_frames_are_flagged(model, tmp_path):
    folder = tmp_path / "dark"
    folder.mkdir()
    import cv2

    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.png"), np.zeros((64, 64, 3), np.uint8))
    summary = run_app(model, RunOptions(source=str(folder), log=None))
    assert summary["flags"] == {"black": 3, "frozen": 2}


def test_http_stream_source(model, video):
    path, info = video
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(path.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{path.name}"
        summary = run_app(model, RunOptions(source=url, log=None, max_frames=10))
    finally:
        server.shutdown()
    assert summary["frames"] >= 1 and summary["source"] == url


def test_sigterm_drains_and_keeps_every_decision(tiny_bundle, video, tmp_path):
    bundle, _ = tiny_bundle
    path, _ = video
    db = tmp_path / "log.sqlite"
    code = ("import sys\nfrom lineside.cli import main\n"
            f"main(['run', {str(bundle)!r}, '--source', {str(path)!r}, '--loop', '--pace', '200', "
            f"'--log', {str(db)!r}, '--json'])\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        time.sleep(0.5)
        try:
            if _rows(db)[0]:
                break
        except sqlite3.Error:
            pass
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    summary = json.loads(out)
    rows, _, runs = _rows(db)
    assert summary["stopped_by"] == "SIGTERM" and summary["frames"] > 0
    assert len(rows) == summary["frames"] == summary["logged"]
    assert runs[0][0] is not None and json.loads(runs[0][1])["frames"] == len(rows)


def test_runtime_never_imports_torch(tiny_bundle, video):
    bundle, _ = tiny_bundle
    path, _ = video
    code = ("import sys\nfrom lineside.cli import main\n"
            f"args = ['run', {str(bundle)!r}, '--source', {str(path)!r}, '--log', 'none', '--frames', '5']\n"
            "try:\n    main(args)\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "import lineside.runtime.bench, lineside.runtime.app\n"
            "print('TORCH' if 'torch' in sys.modules else 'CLEAN')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("CLEAN")


def test_bench_json_has_the_promised_fields(tiny_bundle, video):
    bundle, _ = tiny_bundle
    path, _ = video
    res = CliRunner().invoke(main, ["bench", str(bundle), "--source", str(path), "--seconds", "1", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    for key in ("fps", "naive_fps", "raw_fps", "dropped", "rss_mb"):
        assert r[key] >= 0
    assert r["fps"] > 0 and r["latency_ms"]["p50"] <= r["latency_ms"]["p99"]
    assert set(r["stages_ms"]) == {"capture", "preprocess", "infer", "postprocess", "record"}
    # The ceiling: inference and decoding share the cores, so it lies below both the raw
    # backend's rate and cores x the decoding rate.
    cores = os.cpu_count() or 1
    assert 0 < r["ceiling_fps"] < r["raw_fps"] and r["ceiling_fps"] < cores * r["decode_fps"]
    assert r["ceiling_fps"] == pytest.approx(cores / (cores / r["raw_fps"] + 1 / r["decode_fps"]), rel=0.01)


def test_run_cli_reports_counts(tiny_bundle, video, tmp_path):
    bundle, _ = tiny_bundle
    path, info = video
    res = CliRunner().invoke(main, ["run", str(bundle), "--source", str(path), "--vote", "2/2",
                                    "--log", str(tmp_path / "x.sqlite"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert f"{info['frames']} frames" in res.output and "runs of one voted label" in res.output
    res = CliRunner().invoke(main, ["run", str(bundle), "--source", str(path), "--ok-classes", "bolt"])
    assert res.exit_code == 2 and "bolt" in res.output


def test_overload_drops_frames_instead_of_queueing_them(model):
    """A live source twice as fast as inference: frames are dropped and counted, and
    capture-to-decision latency stays within a few inference times instead of growing."""
    from lineside.runtime.decide import Decider
    from lineside.runtime.loop import LoopSettings, run_loop
    from lineside.runtime.records import Recorder

    class SlowEngine:
        depth = 1
        input = np.zeros((1, model.spec.height, model.spec.width, 3), np.uint8)

        def buffer(self, slot):
            return self.input

        def submit(self, slot, x=None):
            time.sleep(0.02)

        def wait(self, slot):
            return np.full(len(model.labels), 1.0 / len(model.labels), np.float32)

    class FastCamera:
        fps = 100

        def read(self):
            time.sleep(0.01)
            return np.full((48, 64, 3), 120, np.uint8), ""

        def release(self):
            pass

    slow = type(model)(model.path, model.backend, model.metadata, model.labels, model.spec, model.checksum,
                       model._run, lambda hint: SlowEngine())
    recorder = Recorder(None, {})
    summary = run_loop(slow, SourceInfo("cam", "camera", True), LoopSettings(seconds=1.5), Decider(model.labels),
                       recorder, threading.Event(), opener=lambda info: FastCamera())
    recorder.close()
    assert summary["dropped"] > 0.3 * summary["frames_read"]
    infer = summary["stages_ms"]["infer"]["p50"]
    assert summary["latency_ms"]["p99"] < 4 * infer      # bounded: no backlog builds up


# --- RTSP: a real server from Debian's GStreamer packages (tests/rtsp_server.py) ------

RTSP_PACKAGES = "python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good"
RTSP_SERVER = Path(__file__).with_name("rtsp_server.py")


def _rtsp_python():
    """A Python that can run the server (PyGObject with GstRtspServer), or None."""
    probe = "import gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import GstRtspServer"
    for python in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if python and Path(python).exists():
            if subprocess.run([python, "-c", probe], capture_output=True).returncode == 0:
                return python
    return None


class RtspServer:
    def __init__(self, python):
        self.python, self.proc = python, None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"rtsp://127.0.0.1:{self.port}/parts"

    def start(self):
        self.proc = subprocess.Popen([self.python, str(RTSP_SERVER), str(self.port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", self.proc.stderr.read()

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def rtsp():
    python = _rtsp_python()
    if python is None:
        message = f"no RTSP server: apt-get install {RTSP_PACKAGES}"
        if os.environ.get("LINESIDE_REQUIRE_RTSP"):
            pytest.fail(message)
        pytest.skip(message)
    server = RtspServer(python)
    server.start()
    yield server
    server.kill()


def test_rtsp_stream_every_decision_logged(model, rtsp, tmp_path):
    db = tmp_path / "log.sqlite"
    summary = run_app(model, RunOptions(source=rtsp.url, log=str(db), max_frames=45))
    rows, _, runs = _rows(db)
    # The stream's start-up burst (frames FFmpeg buffered while probing) is stale and dropped;
    # after it every frame arrives at camera rate and is decided.
    assert summary["source"] == rtsp.url and summary["frames_read"] == 45
    assert summary["frames"] + summary["dropped"] == 45 and summary["frames"] >= 15
    assert len(rows) == summary["frames"] == summary["logged"]
    assert 25 < summary["stages_ms"]["capture"]["p50"] < 45      # 30 frames per second


def test_rtsp_server_dies_and_comes_back(model, rtsp, tmp_path):
    """Kill the RTSP server mid-stream and start it again on the same port: the loop
    logs the gap as events, reconnects, and goes on with real frames only."""
    db = tmp_path / "log.sqlite"
    result = {}
    worker = threading.Thread(target=lambda: result.update(
        run_app(model, RunOptions(source=rtsp.url, log=str(db), max_frames=60))))
    worker.start()
    deadline = time.time() + 30
    while time.time() < deadline and not _count(db, "decisions") >= 10:
        time.sleep(0.2)
    rtsp.kill()
    before = _count(db, "decisions")
    time.sleep(1.0)
    rtsp.start()
    worker.join(60)
    assert not worker.is_alive()
    kinds = [row[0] for row in sqlite3.connect(db).execute("SELECT kind FROM events ORDER BY id")]
    assert "source_lost" in kinds and "source_back" in kinds
    assert kinds.index("source_lost") < kinds.index("source_back")
    after = _count(db, "decisions")
    assert result["frames_read"] == 60 and result["frames"] == after > before >= 10
    assert result["reconnects"] >= 1


def _count(db, table):
    try:
        with sqlite3.connect(db) as con:
            return con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_log_format_follows_the_extension_in_any_case(model, video, tmp_path):
    path, _ = video
    upper = tmp_path / "x.JSONL"
    run_app(model, RunOptions(source=str(path), log=str(upper), max_frames=3))
    assert [json.loads(x)["type"] for x in upper.read_text().splitlines()].count("decision") == 3
    with pytest.raises(LinesideError, match=r"--log .*x\.txt.*unknown log format"):
        run_app(model, RunOptions(source=str(path), log=str(tmp_path / "x.txt"), max_frames=3))
    assert not (tmp_path / "x.txt").exists()
