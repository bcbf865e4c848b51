"""The status page of `lineside run --http` and `lineside review`: the API, Prometheus metrics,
what is refused, relabelling into a training set, and the pages in a real (headless) browser."""

import csv
import http.client
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from browser import Browser, find_chromium
from lineside.cli import main
from lineside.dataset import combine_sources, load_image_set
from lineside.errors import LinesideError
from lineside.runtime.web import parse_address, read_token
from lineside.video import write_video

TOKEN = "line3-review-token"
ARTIFACTS = Path(os.environ.get("LINESIDE_TEST_ARTIFACTS", Path(__file__).parent / "artifacts"))
ROI = "20,10,120,100"     # inside the 160x120 frames of the test video


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})   # sent as it is: no normalisation of ../
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type"), r.read()
    finally:
        conn.close()


def post(port: int, path: str, body, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        conn.close()


class Station:
    """`lineside run --http` on a looping test video, in its own process."""

    def __init__(self, bundle, video, folder: Path, token: bool = True):
        self.port = free_port()
        self.folder = folder
        self.log = folder / "decisions.sqlite"
        self.save = folder / "saved"
        args = [sys.executable, "-m", "lineside.cli", "run", str(bundle), "--source", str(video), "--loop",
                "--pace", "12", "--roi", ROI, "--log", str(self.log), "--save", str(self.save), "--save-when", "all",
                "--save-max-files", "300", "--station", "line3-st7", "--http", f"127.0.0.1:{self.port}", "--quiet"]
        if token:
            (folder / "token.txt").write_text(TOKEN + "\n")
            args += ["--http-token-file", str(folder / "token.txt")]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"lineside run ended: {self.proc.communicate()}")
            try:
                if json.loads(get(self.port, "/api/status")[2])["frames"] > 0:
                    return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError("the status page never answered")

    def first_saved(self) -> dict:
        """The newest saved frame, once the log holds one (it is written in batches)."""
        deadline = time.time() + 20
        while time.time() < deadline:
            items = json.loads(get(self.port, "/api/review?limit=1")[2])["items"]
            if items:
                return items[0]
            time.sleep(0.2)
        raise AssertionError("no saved frame in the review list")

    def status(self) -> dict:
        return json.loads(get(self.port, "/api/status")[2])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, out, err


@pytest.fixture(scope="module")
def video(synth_test_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("web-video") / "parts.avi"
    write_video(synth_test_dir, out, size=(160, 120), hold=2)
    return out


@pytest.fixture(scope="module")
def station(tiny_bundle, video, tmp_path_factory):
    s = Station(tiny_bundle[0], video, tmp_path_factory.mktemp("station"))
    yield s
    code, _, err = s.stop()
    assert code == 0, err


def test_http_addresses_default_to_loopback_and_tokens_are_checked(tmp_path):
    assert parse_address("8080") == ("127.0.0.1", 8080)
    assert parse_address(":9000") == ("127.0.0.1", 9000)
    assert parse_address("0.0.0.0:8080") == ("0.0.0.0", 8080)
    assert parse_address("[::1]:8080") == ("::1", 8080)
    for bad in ("web", "127.0.0.1:port", "99999"):
        with pytest.raises(LinesideError, match="--http"):
            parse_address(bad)
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(LinesideError, match="12 characters"):
        read_token(tmp_path / "short")
    with pytest.raises(LinesideError, match="--http-token-file"):
        read_token(tmp_path / "missing")
    assert read_token(None, env="") is None
    (tmp_path / "t").write_text(TOKEN + "\nsecond line\n")
    assert read_token(tmp_path / "t") == TOKEN


def test_api_status_has_what_the_page_shows(station):
    s = station.status()
    for key in ("station", "model", "source", "frames", "fps", "capture_to_decision_ms", "dropped_frames",
                "counts", "last", "events", "uptime_s"):
        assert key in s, key
    assert s["station"] == "line3-st7" and s["source"]["state"] == "live"
    assert len(s["model"]["sha256"]) == 64 and s["model"]["precision"] == "fp32"
    assert s["last"]["label"] in s["model"]["labels"] + ["unknown"] and 0 <= s["last"]["confidence"] <= 1
    assert set(s["capture_to_decision_ms"]) == {"p50", "p99"}
    assert sum(s["counts"]["since_start"].values()) == sum(s["counts"]["labels"].values())
    assert abs(sum(s["counts"]["labels"].values()) - s["frames"]) <= 2     # read while the loop runs
    assert s["review"] == {"available": True, "token_required": True, "writable": True}
    time.sleep(0.6)
    later = station.status()
    assert later["frames"] > s["frames"]          # live: the loop goes on while the page is read
    status, ctype, body = get(station.port, "/frame/last.jpg")
    assert status == 200 and ctype == "image/jpeg"
    assert cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR).shape == (120, 160, 3)


PROM_SAMPLE = re.compile(r'^(lineside_[a-z_]+)(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? (-?[0-9.e+-]+)$')


def test_metrics_parse_as_prometheus_text(station):
    status, ctype, body = get(station.port, "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    types, samples = {}, {}
    for line in body.decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif line.startswith("# HELP "):
            continue
        else:
            m = PROM_SAMPLE.match(line)
            assert m, f"not a Prometheus sample: {line!r}"
            assert m.group(1) in types, f"{m.group(1)} has no TYPE line"
            samples.setdefault(m.group(1), []).append(float(m.group(5)))
    assert types["lineside_frames_total"] == "counter" and samples["lineside_frames_total"][0] > 0
    assert samples["lineside_up"] == [1.0]
    assert sum(samples["lineside_decisions_total"]) == sum(samples["lineside_labels_total"])


def test_traversal_unknown_paths_and_relabels_without_the_token_are_refused(station):
    for path in ("/api/frames/../../etc/passwd", "/api/frames/..%2F..%2Fetc%2Fpasswd", "/../pyproject.toml",
                 "/style.css/../../pyproject.toml", "/api/frames/1.jpg/../../decisions.sqlite", "/web/live.js",
                 "/api/frames/-1.jpg", "/api/frames/99999999.jpg"):
        status, _, body = get(station.port, path)
        assert status == 404, path
        assert b"root:" not in body and b"[project]" not in body and b"SQLite" not in body
    item = station.first_saved()
    assert get(station.port, f"/api/frames/{item['id']}.jpg")[0] == 200
    assert post(station.port, f"/api/review/{item['id']}", {"label": "scratch"})[0] == 401
    assert post(station.port, f"/api/review/{item['id']}", {"label": "scratch"}, {"X-Lineside-Token": "wrong" * 4})[0] == 401
    status, _ = post(station.port, f"/api/review/{item['id']}", b"label=scratch",
                     {"X-Lineside-Token": TOKEN, "Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415     # a form posted from another site cannot relabel
    for bad in ("../../etc", "unknown", "", "a/b", "x" * 65):
        status, body = post(station.port, f"/api/review/{item['id']}", {"label": bad}, {"X-Lineside-Token": TOKEN})
        assert status == 400, bad
    assert not (station.save / "reviewed" / "manifest.csv").exists()


def test_a_page_without_a_token_is_read_only(tiny_bundle, video, tmp_path):
    s = Station(tiny_bundle[0], video, tmp_path, token=False)
    try:
        item = s.first_saved()
        status, body = post(s.port, f"/api/review/{item['id']}", {"label": "hat"}, {"X-Lineside-Token": TOKEN})
        assert status == 403 and "read only" in body["error"]
        assert s.status()["review"]["writable"] is False
    finally:
        code, _, err = s.stop()
    assert code == 0, err


def test_review_after_the_run_writes_roi_crops_and_a_manifest_lineside_trains_on(tiny_bundle, video, tmp_path):
    s = Station(tiny_bundle[0], video, tmp_path)
    s.first_saved()
    time.sleep(1.0)
    assert s.stop()[0] == 0
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lineside.cli", "review", str(s.log), "--save", str(s.save),
                             "--http", f"127.0.0.1:{port}", "--http-token-file", str(tmp_path / "token.txt"),
                             "--seconds", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 30
        while True:
            try:
                listing = json.loads(get(port, "/api/review?limit=4")[2])
                break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
                time.sleep(0.2)
        assert get(port, "/api/status")[0] == 404            # no live page after the run
        items = listing["items"]
        assert len(items) == 4 and [i["id"] for i in items] == sorted((i["id"] for i in items), reverse=True)
        db = sqlite3.connect(s.log)
        assert listing["total"] == db.execute("SELECT COUNT(*) FROM decisions WHERE saved IS NOT NULL").fetchone()[0]
        db.close()
        # the video holds each part for 2 frames: a part's frames share a group, shown once
        many = json.loads(get(port, "/api/review?limit=40")[2])["items"]
        groups = {}
        for i in many:
            groups.setdefault(i["group"], []).append(i)
        assert max(map(len, groups.values())) == 2 and len(groups) < len(many)
        for g in groups.values():
            assert len({i["label"] for i in g}) == 1 and [i["frame"] for i in g] == list(range(g[0]["frame"],
                                                                                           g[0]["frame"] - len(g), -1))
        x, y, w, h = (int(v) for v in ROI.split(","))
        status, _, crop = get(port, f"/api/frames/{items[0]['id']}.jpg?crop=roi")
        whole = cv2.imdecode(np.frombuffer(get(port, f"/api/frames/{items[0]['id']}.jpg")[2], np.uint8), 1)
        assert status == 200 and cv2.imdecode(np.frombuffer(crop, np.uint8), 1).shape == (h, w, 3) != whole.shape
        first, second = items[0], items[1]
        confirmed = second["label"] if second["label"] != "unknown" else listing["labels"][0]
        status, entry = post(port, f"/api/review/{first['id']}", {"label": "scratch"}, {"X-Lineside-Token": TOKEN})
        assert status == 200 and entry["label"] == "scratch" and entry["model_label"] == first["label"]
        assert post(port, f"/api/review/{second['id']}", {"label": confirmed},
                    {"X-Lineside-Token": TOKEN})[0] == 200       # confirmed as it was
        # a second opinion moves the frame to its new label
        assert post(port, f"/api/review/{first['id']}", {"label": "dent"}, {"X-Lineside-Token": TOKEN})[0] == 200
        only_ng = json.loads(get(port, "/api/review?verdict=unknown&limit=500")[2])["items"]
        assert all(i["label"] == "unknown" for i in only_ng)
        assert json.loads(get(port, f"/api/review?limit=1&before={first['id']}")[2])["items"][0]["id"] == second["id"]
    finally:
        proc.terminate()
        proc.wait(10)
    out = s.save / "reviewed"
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert {(r["label"], r["decision_id"]) for r in rows} == {("dent", str(first["id"])),
                                                               (confirmed, str(second["id"]))}
    assert not (out / "scratch").exists()      # the moved frame left no empty folder behind
    crop = cv2.imread(str(out / rows[0]["path"]))
    x, y, w, h = (int(v) for v in ROI.split(","))
    assert crop.shape == (h, w, 3)              # the ROI the model saw, not the whole frame
    images = load_image_set(out / "manifest.csv", min_classes=1)
    assert sorted(images.classes) == sorted({"dent", confirmed})


def test_training_reads_several_sources_and_the_last_label_wins(synth_dir, tmp_path):
    old = load_image_set(synth_dir)
    relabelled = tmp_path / "fix.csv"
    moved = old.paths[0]
    relabelled.write_text(f"path,label\n{moved},{old.classes[1]}\n")
    combined = load_image_set(combine_sources([synth_dir, relabelled], tmp_path / "data.csv"))
    assert len(combined) == len(old)
    assert combined.classes[combined.targets[combined.paths.index(moved.resolve())]] == old.classes[1]
    res = CliRunner().invoke(main, ["train", str(synth_dir), str(relabelled), "--out", str(tmp_path / "run"),
                                    "--strategy", "linear", "--image-size", "64", "--views", "1", "--quiet", "--json"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output)
    assert metrics["data"] == str((tmp_path / "run" / "data.csv").resolve())
    assert sum(metrics["train_counts"].values()) == len(old)


# --- the pages in a real browser -----------------------------------------------------------

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    exe = find_chromium()
    if exe is None:
        if os.environ.get("LINESIDE_REQUIRE_BROWSER"):
            pytest.fail("no Chromium found, and LINESIDE_REQUIRE_BROWSER is set")
        pytest.skip("no Chromium: install it (Debian: apt-get install chromium) to test the pages in a browser")
    b = Browser(exe, tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


def test_the_live_page_updates_itself_in_a_browser(station, browser):
    browser.goto(f"http://127.0.0.1:{station.port}/")
    first = int(browser.wait_for("Number(document.getElementById('frames').textContent) > 0 && "
                                 "document.getElementById('frames').textContent"))
    browser.wait_for(f"Number(document.getElementById('frames').textContent) > {first}")   # no reload
    browser.wait_for("document.getElementById('last-frame').complete && "
                     "document.getElementById('last-frame').naturalWidth > 0")
    text = browser.eval("document.body.innerText")
    assert "line3-st7" in text
    label = browser.eval("document.getElementById('last-label').textContent")
    assert label in station.status()["model"]["labels"] + ["unknown"]
    counts = sum(int(browser.eval(f"document.getElementById('count-{k}').textContent"))
                 for k in ("OK", "NG", "unknown", "none"))
    assert counts >= first
    assert browser.eval("document.getElementById('source-state').textContent") == "live"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = browser.screenshot(ARTIFACTS / "live-page.png")
    assert cv2.imread(str(shot)).shape[:2] == (900, 1280)


def test_a_frame_relabelled_on_the_review_page_is_in_the_manifest(station, browser):
    browser.goto(f"http://127.0.0.1:{station.port}/review")
    browser.wait_for("document.querySelectorAll('.card form').length > 0")
    ident = browser.eval(f"""(() => {{
        document.getElementById('token').value = {json.dumps(TOKEN)};
        const card = document.querySelector('.card');
        card.querySelector('input').value = 'scratch';
        card.querySelector('form').requestSubmit();
        return card.dataset.id; }})()""")
    browser.wait_for(f"document.querySelector('.card[data-id=\"{ident}\"]').classList.contains('done')")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.screenshot(ARTIFACTS / "review-page.png")
    rows = list(csv.DictReader(open(station.save / "reviewed" / "manifest.csv")))
    entry = next(r for r in rows if r["decision_id"] == ident)
    assert entry["label"] == "scratch" and (station.save / "reviewed" / entry["path"]).is_file()


def test_frames_of_one_part_are_grouped_and_other_parts_are_not():
    """Consecutive frames with the same label and scene are one part; a different part of
    the same class right after it, a gap in the frames or another part id starts a new one."""
    from lineside.runtime.review import group_parts

    def item(i, frame, label="scratch", scene="a", part=None):
        return {"id": i, "frame": frame, "label": label, "part_id": part, "source": "cam", "scene": scene}

    items = [item(9, 20), item(8, 19), item(7, 18, scene="b"), item(6, 17, scene="b"), item(5, 15, scene="b"),
             item(4, 14, label="dent", scene="b"), item(3, 13, label="dent", scene="b", part="p1")]
    grouped = group_parts(items, lambda a, b: a["scene"] == b["scene"])
    assert [i["group"] for i in grouped] == [9, 9, 7, 7, 5, 4, 3]
