"""Part-triggered inspection: the frames after a trigger answer it, and when none can in
time the answer is NG with a reason (fail safe), never silence."""

import json
import sqlite3
import subprocess
import sys
import time

import pytest

from lineside.errors import LinesideError
from lineside.runtime.trigger import Triggers


def _collect():
    got = []
    return got, got.append


def test_the_frames_after_a_trigger_answer_it_with_a_vote():
    got, sink = _collect()
    t = Triggers(5.0, frames=3, votes=2, on_answer=sink)
    before = time.perf_counter()
    part = t.request("P-17")
    assert t.offer(before, "scratch", "NG", 0.9) is None          # captured before the trigger
    assert t.offer(time.perf_counter(), "ok", "OK", 0.8) == "P-17"
    assert t.offer(time.perf_counter(), "scratch", "NG", 0.7) == "P-17"
    assert not got
    assert t.offer(time.perf_counter(), "ok", "OK", 0.95) == "P-17"
    t.close()
    (a,) = got
    assert (a.part_id, a.label, a.verdict, a.reason, a.frames) == (part, "ok", "OK", "decided", 3)
    assert a.confidence == 0.95


def test_a_burst_of_triggers_is_answered_by_the_frames_that_follow_it():
    """Before, each frame answered one waiting trigger: 15 triggers at 10 FPS waited up to
    1.5 s, some answered by frames of another part, some NG no_frame with the camera live."""
    got, sink = _collect()
    t = Triggers(1.0, frames=1, on_answer=sink)
    early = time.perf_counter()
    burst = [t.request(f"B-{i}") for i in range(15)]
    assert t.offer(early, "ok", "OK", 0.9) is None               # captured before the burst: answers none
    assert t.offer(time.perf_counter(), "ok", "OK", 0.9) == ",".join(burst)
    assert [a.part_id for a in got] == burst and {a.reason for a in got} == {"decided"}
    later = t.request("L-1")
    assert t.offer(time.perf_counter(), "scratch", "NG", 0.8) == later   # the burst's parts are done
    t.close()
    assert got[-1].part_id == "L-1" and got[-1].label == "scratch"
    voted, sink2 = _collect()
    v = Triggers(1.0, frames=3, votes=2, on_answer=sink2)
    first = [v.request(f"V-{i}") for i in range(5)]
    v.offer(time.perf_counter(), "ok", "OK", 0.9)
    second = v.request("V-late")                                 # comes in between the frames
    v.offer(time.perf_counter(), "ok", "OK", 0.9)
    assert v.offer(time.perf_counter(), "ok", "OK", 0.9) == ",".join(first + [second])
    assert [a.part_id for a in voted] == first and all(a.frames == 3 for a in voted)
    v.offer(time.perf_counter(), "ok", "OK", 0.9)
    assert [a.part_id for a in voted] == first + [second]
    v.close()


def test_no_frame_in_time_is_answered_ng_within_the_timeout():
    got, sink = _collect()
    t = Triggers(0.2, on_answer=sink)
    t0 = time.perf_counter()
    t.request("P-1")
    deadline = time.time() + 5
    while not got and time.time() < deadline:
        time.sleep(0.01)
    late = time.perf_counter() - t0
    assert got and (got[0].verdict, got[0].reason, got[0].label) == ("NG", "no_frame", "unknown")
    assert 0.2 <= late < 0.2 + 0.15
    votes = Triggers(0.2, frames=3, votes=2, on_answer=sink)
    votes.request("P-2")
    votes.offer(time.perf_counter(), "ok", "OK", 0.9)           # one frame of the three
    time.sleep(0.4)
    assert got[-1].part_id == "P-2" and got[-1].reason == "timeout" and got[-1].verdict == "NG"
    votes.request("P-3")
    votes.close()
    assert got[-1].part_id == "P-3" and got[-1].reason == "stopped" and got[-1].verdict == "NG"
    failed = Triggers(5.0, on_answer=sink)
    failed.request("P-4")
    failed.close("error")                                        # the loop itself failed
    assert got[-1].part_id == "P-4" and got[-1].reason == "error" and got[-1].verdict == "NG"
    t.close()
    with pytest.raises(LinesideError, match="--trigger-timeout"):
        Triggers(0)


def test_stdin_triggers_answer_on_stdout_and_in_the_log(tiny_bundle, synth_test_dir, tmp_path):
    from lineside.video import write_video

    bundle, _ = tiny_bundle
    video = tmp_path / "parts.avi"
    write_video(synth_test_dir, video, size=(160, 120), hold=2)
    db = tmp_path / "log.sqlite"
    labels = json.loads((bundle / "bundle.json").read_text())["metadata"]["labels"]
    proc = subprocess.Popen([sys.executable, "-m", "lineside.cli", "run", str(bundle), "--source", str(video),
                             "--pace", "30", "--loop", "--trigger", "stdin", "--ok-classes", labels[0],
                             "--log", str(db), "--seconds", "8", "--quiet"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    proc.stdin.write("P-1\n\nP-3\n")
    proc.stdin.flush()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    answers = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [a["part_id"] for a in answers] == ["P-1", "part-1", "P-3"]
    assert all(a["reason"] == "decided" and a["verdict"] in ("OK", "NG") for a in answers)
    rows = sqlite3.connect(db).execute("SELECT part_id, label FROM decisions WHERE part_id IS NOT NULL").fetchall()
    # the three lines came at once: the frame after them answers all three (one row naming them all)
    assert sorted(p for r in rows for p in r[0].split(",")) == ["P-1", "P-3", "part-1"]
    assert {p: r[1] for r in rows for p in r[0].split(",")}["P-1"] == answers[0]["label"]
    kinds = [k for k, in sqlite3.connect(db).execute("SELECT kind FROM events")]
    assert kinds.count("part_answer") == 3
