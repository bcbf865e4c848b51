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

import cv2
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


# --- faults: damaged input, odd frames, sources that never deliver, logs that fail ------

def _damage(video: Path, out: Path, frames: list[int]) -> Path:
    """A copy of an MJPEG AVI whose listed frames (0-based) no longer decode."""
    data = bytearray(video.read_bytes())
    starts = [i for i in range(len(data) - 2) if data[i] == 0xFF and data[i + 1] == 0xD8 and data[i + 2] == 0xFF]
    for k in frames:
        data[starts[k]:starts[k] + 600] = bytes(600)
    out.write_bytes(bytes(data))
    return out


def test_a_damaged_video_is_read_to_its_end_and_each_damage_is_an_event(model, video, tmp_path):
    path, info = video
    damaged = _damage(path, tmp_path / "damaged.avi", [5, 6, 20, info["frames"] - 10])
    db = tmp_path / "log.sqlite"
    summary = run_app(model, RunOptions(source=str(damaged), log=str(db)))
    assert summary["frames"] == info["frames"] - 4 == summary["logged"]
    assert summary["decode_errors"] == 3 and summary["exit_code"] == 0
    details = [d for k, d in sqlite3.connect(db).execute("SELECT kind, detail FROM events") if k == "decode_error"]
    assert len(details) == 3 and "2 frame(s) after frame 5" in details[0]


def _folder_of_sizes(tmp_path, synth_test_dir, sizes):
    import cv2

    folder = tmp_path / "frames"
    folder.mkdir()
    src = sorted((synth_test_dir / "hat").glob("*.png"))
    for i, (w, h) in enumerate(sizes):
        image = cv2.resize(cv2.imread(str(src[i % len(src)])), (w, h))
        cv2.imwrite(str(folder / f"{i:03d}.png"), image)
    return folder


def test_a_frame_the_roi_does_not_fit_is_decided_unknown_and_flagged(model, synth_test_dir, tmp_path):
    """Frames after the first that are smaller than the ROI: not classified from a
    clipped crop but decided unknown (NG with --ok-classes), flagged roi_outside, with an
    event; a frame of another size that the ROI still fits is flagged size_changed."""
    sizes = [(160, 120), (160, 120), (64, 48), (64, 48), (160, 120), (200, 150)]
    folder = _folder_of_sizes(tmp_path, synth_test_dir, sizes)
    log = tmp_path / "log.jsonl"
    summary = run_app(model, RunOptions(source=str(folder), log=str(log), roi="10,10,100,100",
                                        ok_classes=model.labels[0]))
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    rows = [x for x in lines if x["type"] == "decision"]
    assert summary["frames"] == 6 == len(rows)
    assert [r["flags"] for r in rows] == [[], [], ["roi_outside"], ["roi_outside"], [], ["size_changed"]]
    for r in rows[2:4]:
        assert (r["label"], r["verdict"], r["confidence"], r["probabilities"]) == ("unknown", "NG", 0.0, {})
    assert all(r["label"] != "unknown" and r["probabilities"] for r in rows[:2] + rows[4:])
    kinds = [x["kind"] for x in lines if x["type"] == "event"]
    assert kinds.count("roi_outside") == 1 and "roi_fits" in kinds and "frame_size" in kinds
    assert summary["flags"] == {"roi_outside": 2, "size_changed": 1}


def test_a_source_that_never_delivers_exits_3_naming_it(tiny_bundle, tmp_path):
    bundle, _ = tiny_bundle
    with socket.socket() as s:        # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"rtsp://127.0.0.1:{port}/x"
    t0 = time.monotonic()
    res = CliRunner().invoke(main, ["run", str(bundle), "--source", url, "--source-timeout", "1.5",
                                    "--log", str(tmp_path / "x.sqlite"), "--quiet"])
    assert res.exit_code == 3, res.output
    assert f"--source {url}: no frame for 1.5 s" in res.output and time.monotonic() - t0 < 20
    kinds = [r[0] for r in sqlite3.connect(tmp_path / "x.sqlite").execute("SELECT kind FROM events")]
    # (the capture thread may record one last retry while the run stops)
    assert "source_unavailable" in kinds and kinds.count("source_timeout") == 1
    assert kinds.index("source_unavailable") < kinds.index("source_timeout")
    res = CliRunner().invoke(main, ["run", str(bundle), "--source", url, "--seconds", "1.5", "--log", "none",
                                    "--json"])
    assert res.exit_code == 3 and "no frame was ever received" in res.output


def test_a_camera_that_does_not_exist_is_an_error_not_an_outage(model):
    from lineside.runtime.sources import gstreamer_available, unfixable

    if not Path("/dev").is_dir() or Path("/dev/video97").exists():
        pytest.fail("this test needs a Linux /dev without /dev/video97")
    t0 = time.monotonic()
    with pytest.raises(LinesideError, match=r"--source 97: no such camera \(/dev/video97 does not exist"):
        run_app(model, RunOptions(source="97", log=None, seconds=20))
    assert time.monotonic() - t0 < 5
    pipeline = describe_source("videotestsrc ! videoconvert ! appsink")
    assert (unfixable(pipeline) is None) == gstreamer_available()


def test_a_gap_in_the_source_resets_the_vote_and_reports_its_real_length():
    """A stream that stalls (its read blocks, then fails) is lost from its last frame on:
    the gap reported is the stall plus the reconnect, not the time to reopen alone; the
    first frame after the gap carries after_gap, on which the loop resets the vote."""
    events, opens = [], []

    def opener(info):
        opens.append(time.monotonic())
        left = [3]

        class Reader:
            fps = 30

            def read(self):
                if left[0] == 0:
                    if len(opens) == 1:
                        time.sleep(0.6)       # a stalled stream: the read times out
                    return None, ""
                left[0] -= 1
                return np.full((8, 8, 3), 50, np.uint8), ""

            def release(self):
                pass

        return Reader()

    slot, stop = FrameSlot(block=True), threading.Event()
    cap = Capture(SourceInfo("cam", "camera", True), slot, stop, opener=opener, backoff=(0.01, 0.05),
                  on_event=lambda kind, detail: events.append((kind, detail)), max_frames=6)
    cap.start()
    frames = []
    try:
        while True:
            frames.append(slot.get(timeout=5))
    except Closed:
        pass
    cap.join(5)
    assert [f.after_gap for f in frames] == [False, False, False, True, False, False]
    back = [d for k, d in events if k == "source_back"]
    assert len(back) == 1 and float(back[0].split("gap of ")[1].split(" s")[0]) >= 0.5

    d = Decider(["a", "b"], vote=parse_vote("2/3"))
    d(np.array([0.9, 0.1]))
    d(np.array([0.9, 0.1]))
    d.reset()
    assert d(np.array([0.9, 0.1])).decision is None      # one vote after the gap, not three


def test_unwritable_log_and_save_paths_are_one_line_errors(tiny_bundle, video, tmp_path):
    bundle, _ = tiny_bundle
    path, _ = video
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for args, option in ((["--log", str(blocker / "x.sqlite")], "--log"),
                         (["--log", str(blocker / "deep" / "x.jsonl")], "--log"),
                         (["--log", "none", "--save", str(blocker / "saved")], "--save")):
        res = CliRunner().invoke(main, ["run", str(bundle), "--source", str(path), "--frames", "2", *args])
        assert res.exit_code == 2, res.output
        assert res.output.startswith(f"error: {option} {blocker}") and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1


def _paced(model, path, db, **kw):
    result = {}
    opts = RunOptions(source=str(path), log=str(db), pace=kw.pop("pace", 40), loop=True, **kw)
    worker = threading.Thread(target=lambda: result.update(run_app(model, opts)))
    worker.start()
    return worker, result


def _wait_for_rows(db, n, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline and _count(db, "decisions") < n:
        time.sleep(0.1)


def test_a_log_locked_by_another_program_loses_nothing(model, video, tmp_path):
    """Another program holds the SQLite log's write lock for 3 s mid-run: the loop keeps
    deciding, the decisions wait and are written when the lock is released, an event says
    for how long, and every decision is in the log."""
    path, _ = video
    db = tmp_path / "log.sqlite"
    worker, result = _paced(model, path, db, max_frames=160)
    _wait_for_rows(db, 20)
    other = sqlite3.connect(db, timeout=10)
    other.execute("BEGIN EXCLUSIVE")
    held_from = time.time()
    time.sleep(3.0)
    other.rollback()
    other.close()
    worker.join(60)
    assert not worker.is_alive() and time.time() - held_from >= 3.0
    con = sqlite3.connect(db)
    assert result["frames"] == 160 == result["logged"] == con.execute("SELECT COUNT(*) FROM decisions").fetchone()[0]
    assert result["not_logged"] == 0 and result["exit_code"] == 0
    detail = [d for k, d in con.execute("SELECT kind, detail FROM events") if k == "log_unwritable"]
    assert len(detail) == 1 and "locked" in detail[0] and "decisions waited in memory" in detail[0]
    assert json.loads(con.execute("SELECT summary FROM runs").fetchone()[0])["logged"] == 160


def test_a_deleted_log_is_noticed_and_started_again(model, video, tmp_path):
    path, _ = video
    db = tmp_path / "log.sqlite"
    worker, result = _paced(model, path, db, max_frames=120)
    _wait_for_rows(db, 30)
    for p in tmp_path.glob("log.sqlite*"):
        p.unlink()
    worker.join(60)
    con = sqlite3.connect(db)
    rows = con.execute("SELECT COUNT(*) FROM decisions").fetchone()[0]
    assert rows == result["logged"] > 0 and result["log_recreated"] == 1
    assert result["logged"] + result["deleted_with_log"] == result["frames"] == 120
    kinds = [k for k, in con.execute("SELECT kind FROM events")]
    assert kinds[0] == "log_recreated"
    summary = json.loads(con.execute("SELECT summary FROM runs").fetchone()[0])
    assert summary["logged"] == rows and summary["deleted_with_log"] == result["deleted_with_log"]


def test_a_log_on_a_full_disk_keeps_deciding_and_writes_when_space_is_back(model, video, tmp_path, monkeypatch):
    """The JSON-lines log's disk is full for a while (each write fails with ENOSPC): no
    half lines, the decisions wait and are written once a write succeeds, and the summary
    counts what is in the file."""
    import errno

    from lineside.runtime import records

    path, _ = video
    log = tmp_path / "log.jsonl"
    real_write, full = os.write, threading.Event()

    def write(fd, data):
        if full.is_set() and fd == getattr(recorder_log[0], "fd", None):
            real_write(fd, bytes(data[:7]))      # part of the batch gets out, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    recorder_log = [None]
    real_open = records.open_log

    def open_log(p, info):
        recorder_log[0] = real_open(p, info)
        return recorder_log[0]

    monkeypatch.setattr(records, "open_log", open_log)
    monkeypatch.setattr(records.os, "write", write)
    worker, result = _paced(model, path, log, max_frames=150)
    deadline = time.time() + 30
    while time.time() < deadline and (not log.exists() or log.read_text().count('"decision"') < 20):
        time.sleep(0.1)
    full.set()
    time.sleep(1.5)
    full.clear()
    worker.join(60)
    lines = [json.loads(x) for x in log.read_text().splitlines()]     # every line whole
    decisions = [x["frame"] for x in lines if x["type"] == "decision"]
    assert sorted(decisions) == list(range(1, 151)) == sorted(set(decisions))
    assert result["logged"] == 150 and result["not_logged"] == 0
    events = [x for x in lines if x["type"] == "event" and x["kind"] == "log_unwritable"]
    assert len(events) == 1 and "No space left" in events[0]["detail"]


def test_when_the_log_buffer_overflows_the_loss_is_counted_and_the_exit_status_says_so(model, video, tmp_path,
                                                                                      monkeypatch):
    from lineside.runtime import records

    path, _ = video
    db = tmp_path / "log.sqlite"
    monkeypatch.setattr(records, "CLOSE_RETRY_SECONDS", 1.0)
    real_write = records.SqliteLog.write
    broken = threading.Event()

    def write(self, decisions, events):
        if broken.is_set():
            raise sqlite3.OperationalError("database or disk is full")
        return real_write(self, decisions, events)

    monkeypatch.setattr(records.SqliteLog, "write", write)
    real_recorder = records.Recorder
    from lineside.runtime import app as app_module

    monkeypatch.setattr(app_module, "Recorder", lambda *a, **k: real_recorder(*a, **k, buffer_rows=25))
    worker, result = _paced(model, path, db, max_frames=40, pace=100)
    _wait_for_rows(db, 5)
    broken.set()
    worker.join(60)
    logged = _count(db, "decisions")
    assert result["logged"] == logged and result["logged"] + result["not_logged"] == result["frames"]
    assert result["frames"] + result["dropped"] == result["frames_read"] == 40   # a busy machine may drop frames
    assert result["not_logged"] > 0 and result["exit_code"] == 4


def _mount_tmpfs(folder: Path, size: str) -> Path:
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        message = f"cannot mount a tmpfs here ({done.stderr.strip()}): the fault tests need root"
        if os.environ.get("LINESIDE_REQUIRE_FAULTS"):
            pytest.fail(message)
        pytest.skip(message)
    return folder


@pytest.fixture
def small_disk(tmp_path):
    """A 256 kB tmpfs: a --save disk that fills up after a few frames (needs root)."""
    mount = _mount_tmpfs(tmp_path / "small-disk", "256k")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.fixture
def log_disk(tmp_path):
    mount = _mount_tmpfs(tmp_path / "log-disk", "2m")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_log_on_a_real_full_disk_loses_nothing_once_space_is_back(model, video, log_disk):
    """The log's disk fills up mid-run (another file takes all the space) and is freed 2 s
    later: the decisions made meanwhile are in the log, and the summary says what happened."""
    path, _ = video
    db = log_disk / "log.sqlite"
    worker, result = _paced(model, path, db, max_frames=200)
    _wait_for_rows(db, 20)
    filler = log_disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    time.sleep(2.0)
    filler.unlink()
    worker.join(60)
    con = sqlite3.connect(db)
    assert result["frames"] == 200 == result["logged"] == con.execute("SELECT COUNT(*) FROM decisions").fetchone()[0]
    assert result["exit_code"] == 0 and result["not_logged"] == 0
    detail = [d for k, d in con.execute("SELECT kind, detail FROM events") if k == "log_unwritable"]
    assert len(detail) == 1 and "full" in detail[0]
    assert json.loads(con.execute("SELECT summary FROM runs").fetchone()[0])["logged"] == 200


def test_faults_during_a_live_run_lose_no_decision(tiny_bundle, rtsp, small_disk, tmp_path):
    """The fault test: a live RTSP run of about half a minute during which the --save disk
    fills up, another program holds the log's write lock for 4 s, and the camera (RTSP
    server) is killed and started again. Afterwards every decision the run reported is in
    the log, the events explain each fault, and the process exited 0."""
    bundle, _ = tiny_bundle
    db = tmp_path / "log.sqlite"
    proc = subprocess.Popen([sys.executable, "-m", "lineside.cli", "run", str(bundle), "--source", rtsp.url,
                             "--seconds", "30", "--log", str(db), "--save", str(small_disk), "--save-when", "all",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])))
    try:
        _wait_for_rows(db, 30, timeout=40)
        held = sqlite3.connect(db, timeout=10)
        held.execute("BEGIN EXCLUSIVE")
        time.sleep(4.0)
        held.rollback()
        held.close()
        time.sleep(2.0)
        rtsp.kill()
        time.sleep(1.5)
        rtsp.start()
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    summary = json.loads(out)
    con = sqlite3.connect(db)
    rows = con.execute("SELECT COUNT(*) FROM decisions").fetchone()[0]
    assert summary["frames"] == summary["logged"] == rows > 100 and summary["not_logged"] == 0
    events = con.execute("SELECT kind, detail FROM events ORDER BY id").fetchall()
    kinds = [k for k, _ in events]
    assert summary["save_failed"] == kinds.count("save_failed") > 0 and summary["saved"] > 0
    assert any("No space left" in d for k, d in events if k == "save_failed")
    assert [d for k, d in events if k == "log_unwritable" and "locked" in d]
    assert "source_lost" in kinds and "source_back" in kinds and summary["reconnects"] >= 1
    assert json.loads(con.execute("SELECT summary FROM runs").fetchone()[0])["logged"] == rows


def test_data_video_says_where_the_parts_sit(video, tmp_path):
    """The square 64-px parts centred on a 160x120 frame sit in its middle 120x120: the
    --roi that lineside run needs, or the grey bars beside them are inspected too."""
    import cv2

    out, info = video
    assert info["roi"] == [20, 0, 120, 120]
    cap = cv2.VideoCapture(str(out))
    ok, frame = cap.read()
    cap.release()
    assert ok
    x, y, w, h = info["roi"]
    outside = np.concatenate([frame[:, :x].ravel(), frame[:, x + w:].ravel()]).astype(float)
    assert abs(outside.mean() - 96) < 8            # the grey of the bars, with the video's noise
    assert frame[y:y + h, x:x + w].astype(float).std() > outside.std() * 2


def test_part_label_is_the_first_label_n_of_m_frames_agree_on():
    from lineside.runtime.linescore import part_label

    assert part_label(["a", "b", "b"], (1, 1)) == "a"
    assert part_label(["a", "b", "b"], (2, 3)) == "b"
    assert part_label(["a", "b", "a"], (2, 2)) == "unknown"
    assert part_label(["a", "a", "b"], (2, 3)) == "a"


def test_score_a_replay_against_the_truth_and_sweep_the_settings(model, video, tmp_path):
    """The video's labels are known: every part's answer is worked out again from the log,
    and escapes and false calls counted for each --reject-below and --vote."""
    path, info = video
    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps(info))
    db = tmp_path / "replay.sqlite"
    ok = "card,cube"
    run_app(model, RunOptions(source=str(path), log=str(db), ok_classes=ok, roi=",".join(map(str, info["roi"]))))
    res = CliRunner().invoke(main, ["score", str(db), "--truth", str(truth), "--json", "--plot",
                                    str(tmp_path / "tradeoff.png")])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    plot = cv2.imread(r["plot"])
    assert plot is not None and plot.shape[0] > 200 and (plot < 128).any()      # drawn, and something on it
    n = info["parts"]
    assert r["parts"] == n and r["frames_per_part"] == 2 and r["frames_decided"] == info["frames"]
    assert r["good_parts"] == sum(label in ("card", "cube") for label in info["labels"])
    assert {row["vote"] for row in r["sweep"]} == {"1/1", "2/2"}     # votes over at most 2 frames
    for row in r["sweep"]:
        assert 0 <= row["escapes"] <= r["defective_parts"] and 0 <= row["false_calls"] <= r["good_parts"]
    first = [row for row in r["sweep"] if row["vote"] == "1/1"]
    # the first frame decides alone: a stricter threshold only turns answers into unknown (NG),
    # so escapes never rise and false calls never fall
    assert all(a["escapes"] >= b["escapes"] and a["false_calls"] <= b["false_calls"] for a, b in zip(first, first[1:]))
    b = r["best"]
    assert (b["escapes"], b["false_calls"]) == min((x["escapes"], x["false_calls"]) for x in r["sweep"])
    # recomputed by hand for one setting: no threshold, the first frame of each part (the
    # loop numbers frames from 1)
    con = sqlite3.connect(db)
    labels = json.loads(con.execute("SELECT labels FROM runs").fetchone()[0])
    probs = dict(con.execute("SELECT frame, probabilities FROM decisions").fetchall())
    con.close()
    right = sum(max(labels, key=lambda k, p=json.loads(probs[2 * i + 1]): p[k]) == t for i, t in enumerate(info["labels"]))
    assert first[0]["reject_below"] is None and first[0]["right"] == right
    # the settings a run needs: which labels are OK
    plain = tmp_path / "plain.sqlite"
    run_app(model, RunOptions(source=str(path), log=str(plain), max_frames=4))
    res = CliRunner().invoke(main, ["score", str(plain), "--truth", str(truth)])
    assert res.exit_code == 2 and "--ok-classes" in res.output
    res = CliRunner().invoke(main, ["score", str(db), "--truth", str(tmp_path / "none.json")])
    assert res.exit_code == 2 and "--truth" in res.output


def test_shape_warning_names_a_frame_unlike_the_training_images():
    from lineside.runtime.loop import shape_warning

    assert shape_warning((64, 64), None, [64, 64]) is None
    assert "another shape" in shape_warning((160, 120), None, [64, 64])
    assert "25x their size" in shape_warning((320, 320), None, [64, 64])
    assert shape_warning((160, 120), (20, 0, 120, 120), [64, 64]) is None       # --roi given
    assert shape_warning((160, 120), None, None) is None                        # size unknown


def test_a_run_without_roi_on_frames_unlike_the_training_images_says_so(model, video, tmp_path):
    path, info = video
    assert model.metadata.provenance["train_image_size"] == [64, 64]
    for roi, expected in ((None, 1), (",".join(map(str, info["roi"])), 0)):
        log = tmp_path / f"{expected}.jsonl"
        run_app(model, RunOptions(source=str(path), log=str(log), roi=roi, max_frames=6))
        events = [json.loads(line) for line in log.read_text().splitlines()]
        missing = [e for e in events if e.get("type") == "event" and e["kind"] == "roi_missing"]
        assert len(missing) == expected
        if expected:
            assert "--roi" in missing[0]["detail"] and "160x120" in missing[0]["detail"]
