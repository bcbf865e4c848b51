"""Shadow mode: a candidate decides the frames beside the line, logged and sent nowhere;
`lineside compare` reads both back; promotion and rollback are one action each on the page,
logged with who asked, and switch between two frames."""

import http.client
import json
import sqlite3
import threading
import time

import cv2
import pytest
from click.testing import CliRunner

from lineside.cli import main
from lineside.runtime.app import RunOptions, run_app
from lineside.runtime.model import open_checked
from test_products import Frames
from test_updates import second_bundle  # noqa: F401 - the fixture
from test_web import free_port

TOKEN = "shadow-review-token"


def _post(port, path, token=TOKEN):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json", **({"X-Lineside-Token": token} if token else {})}
    conn.request("POST", path, body=b"{}", headers=headers)
    r = conn.getresponse()
    body = json.loads(r.read() or b"{}")
    conn.close()
    return r.status, body


def test_shadow_promote_rollback_and_compare(tiny_bundle, second_bundle, synth_test_dir, tmp_path,  # noqa: F811
                                             monkeypatch):
    monkeypatch.setenv("LINESIDE_HTTP_TOKEN", TOKEN)
    line, candidate = open_checked(tiny_bundle[0]), open_checked(second_bundle)
    labels = list(line.labels)
    images = [cv2.imread(str(p)) for p in sorted(synth_test_dir.rglob("*.png"))[:10]]
    done = threading.Event()
    log, port = tmp_path / "log.sqlite", free_port()
    source = tmp_path / "src"       # the frames come from the opener; the folder only names the source
    source.mkdir()
    result = {}
    run = threading.Thread(target=lambda: result.update(run_app(line, RunOptions(
        source=str(source), log=str(log), pace=30, seconds=300, shadow=str(second_bundle), ok_classes=labels[0],
        http=f"127.0.0.1:{port}"),
        opener=lambda info: Frames(images, done), load_bundle=open_checked)))
    run.start()

    def status():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/api/status")
        body = json.loads(conn.getresponse().read())
        conn.close()
        return body

    def wait(pred, what):
        deadline = time.monotonic() + 60
        while True:
            try:
                if pred(status()):
                    return
            except (OSError, KeyError, TypeError):
                pass
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    def logged(pred, what):
        deadline = time.monotonic() + 60
        while True:
            with sqlite3.connect(log) as con:
                if pred(con):
                    return
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    try:
        wait(lambda s: (s["shadow"] or {}).get("frames", 0) >= 20, "the shadow never decided 20 frames")
        assert _post(port, "/api/shadow/promote", token=None)[0] == 401        # the token is needed
        code, body = _post(port, "/api/shadow/promote")
        assert code == 200 and body["promoted"] == candidate.checksum
        assert _post(port, "/api/shadow/promote")[0] == 409                   # nothing left to promote
        logged(lambda con: con.execute("SELECT count(*) FROM decisions WHERE model_sha256 = ?",
                                       (candidate.checksum,)).fetchone()[0] > 0, "the promoted model decided nothing")
        code, body = _post(port, "/api/rollback")
        assert code == 200 and body["rolled_back_to"] == line.checksum
        logged(lambda con: con.execute("SELECT model_sha256 FROM decisions ORDER BY frame DESC LIMIT 1")
               .fetchone()[0] == line.checksum, "the rolled-back model decided nothing")
    finally:
        done.set()
        run.join(120)
    with sqlite3.connect(log) as con:
        rows = con.execute("SELECT frame, model_sha256 FROM decisions ORDER BY frame").fetchall()
        events = con.execute("SELECT kind, detail FROM events WHERE kind IN ('promoted', 'rolled_back') "
                             "ORDER BY id").fetchall()
        shadow_first = con.execute("SELECT min(frame) FROM shadow").fetchone()[0]
    models = [m for _, m in rows]
    first_promoted = models.index(candidate.checksum)
    assert set(models[:first_promoted]) == {line.checksum}                   # the shadow reached no decision
    assert candidate.checksum in models and models[-1] == line.checksum       # promoted, then rolled back
    assert [k for k, _ in events] == ["promoted", "rolled_back"] and "the page (127.0.0.1)" in events[0][1]
    assert shadow_first is not None and result["frames"] == result["logged"]
    assert 0 < result["shadow"]["coverage"] <= 1 and result["shadow"]["frames"] >= 20
    res = CliRunner().invoke(main, ["compare", str(log), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["frames"] >= 20 and 0 <= report["agreement"] <= 1
    assert report["shadow_model"] == candidate.checksum and report["line_model"] == line.checksum
    assert set(report["reject_rate"]) == {"line", "shadow"}
    assert sum(sum(r.values()) for r in report["confusion"].values()) == report["frames"]
    assert len(report["disagreements"]) == min(50, round(report["frames"] * (1 - report["agreement"])))
    res = CliRunner().invoke(main, ["compare", str(tmp_path / "none.sqlite")])
    assert res.exit_code == 2 and "no such log" in res.output
