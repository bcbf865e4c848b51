"""Updates without stopping the line (`lineside run --updates DIR`): new bundles copied into
a watched folder take over between two frames, 50 times under a 30 FPS stream, with no
decision lost and each attributed to its model; a bundle that fails a check is refused
and the old model keeps running."""

import json
import os
import shutil
import sqlite3
import threading
import time

import cv2
import pytest

from lineside.runtime import updates
from lineside.runtime.app import RunOptions, run_app
from lineside.runtime.model import open_checked
from test_mqtt import broker  # noqa: F401 - the fixture, for the update asked for over MQTT
from test_products import Frames


@pytest.fixture(scope="module")
def second_bundle(tiny_run, tmp_path_factory):
    """Another export of the same run (no test-time views): another model hash."""
    from lineside.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("second") / "bundle"
    export_bundle(tiny_run[0], out, formats=["onnx", "openvino"], int8=False, speed_seconds=0, tta=False)
    return out


def _drop(src, folder, name, note):
    """Copy a bundle into the watched folder under a new name, its bundle.json made unique.
    The model files are hard links (50 real copies took 1.3 GB of the test machine's disk);
    bundle.json is unlinked before it is rewritten, so the source bundle is never changed."""
    tmp = folder.parent / f".{name}"
    shutil.copytree(src, tmp, copy_function=os.link)
    doc = json.loads((tmp / "bundle.json").read_text())
    doc["note"] = note
    (tmp / "bundle.json").unlink()
    (tmp / "bundle.json").write_text(json.dumps(doc))
    tmp.rename(folder / name)          # whole, in one step, as an operator's script would


def _events(log, kind: str) -> int:
    """How many events of `kind` the run's SQLite log holds (0 before it is written)."""
    try:
        with sqlite3.connect(f"file:{log}?mode=ro", uri=True) as con:
            return con.execute("SELECT count(*) FROM events WHERE kind = ?", (kind,)).fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _wait_for_event(log, kind: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not _events(log, kind):
        assert time.monotonic() < deadline, f"no {kind} event in {seconds} s"
        time.sleep(0.05)
    time.sleep(0.3)          # a few frames more


def test_50_updates_under_a_30_fps_stream_lose_nothing(tiny_bundle, second_bundle, synth_test_dir, tmp_path,
                                                       monkeypatch):
    monkeypatch.setattr(updates, "UPDATE_SETTLE_SECONDS", 0.0)
    monkeypatch.setattr(updates, "SCAN_SECONDS", 0.02)
    monkeypatch.setattr(updates, "RELEASE_AFTER", 3)
    first = tiny_bundle[0]
    labels = json.loads((first / "bundle.json").read_text())["metadata"]["labels"]
    sha = {open_checked(b).checksum for b in (first, second_bundle)}
    assert len(sha) == 2
    watched = tmp_path / "updates"
    watched.mkdir()
    images = [cv2.imread(str(p)) for p in sorted(synth_test_dir.rglob("*.png"))[:8]]
    done = threading.Event()
    log = tmp_path / "log.sqlite"
    result = {}
    model = open_checked(first)
    run = threading.Thread(target=lambda: result.update(run_app(model, RunOptions(
        source=str(tmp_path), log=str(log), pace=30, seconds=300, updates=str(watched), ok_classes=labels[0]),
        opener=lambda info: Frames(images, done), load_bundle=open_checked)))
    run.start()

    def loaded() -> int:
        with sqlite3.connect(log) as con:
            return con.execute("SELECT count(*) FROM events WHERE kind = 'product_switch'").fetchone()[0]

    try:
        time.sleep(1.0)
        for k in range(50):
            _drop(second_bundle if k % 2 == 0 else first, watched, f"u{k:02d}", k)
            deadline = time.monotonic() + 60
            while loaded() < k + 1:
                assert time.monotonic() < deadline, f"update {k} never took over"
                time.sleep(0.05)
        # a bundle that cannot serve this line (no such OK class... here: a broken model file) is refused
        broken = tmp_path / "broken"
        shutil.copytree(second_bundle, broken)
        (broken / "model_fp32.bin").write_bytes(b"broken")
        _drop(broken, watched, "zz-broken", "broken")
        _wait_for_event(log, "update_refused", 30)
    finally:
        done.set()
        run.join(120)
    assert result["updates"]["loaded"] == 50 and result["updates"]["refused"] == 1
    assert result["updates"]["released"] >= 49
    # every frame read is decided and logged, or counted as dropped: a paced source keeps its newest frame
    # when the loop falls behind (on a busy 2-core machine, while an update's model compiles beside it, one
    # frame of 471 was), which is the live behaviour, not a loss
    assert result["frames"] + result["dropped"] == result["frames_read"]
    assert result["dropped"] <= result["frames_read"] // 10
    assert result["frames"] == result["logged"] and result["not_logged"] == 0
    with sqlite3.connect(log) as con:
        rows = con.execute("SELECT frame, model_sha256 FROM decisions ORDER BY frame").fetchall()
        refused = con.execute("SELECT detail FROM events WHERE kind = 'update_refused'").fetchall()
    seen = [r[0] for r in rows]          # in order, each once; a gap only where a frame was dropped
    assert seen == sorted(set(seen)) and len(seen) == result["frames"]
    assert len(set(range(1, seen[-1] + 1)) - set(seen)) <= result["dropped"]
    assert {r[1] for r in rows} == sha
    changes = sum(a[1] != b[1] for a, b in zip(rows, rows[1:]))
    assert changes == 50                      # each update decided frames of its own, in turn
    assert "zz-broken" in refused[0][0] and "model_fp32.bin" in refused[0][0]
    assert result["updates"]["model_sha256"] == open_checked(first).checksum   # u49 was the first bundle again


def test_the_model_an_update_replaced_is_freed(tiny_bundle, second_bundle, synth_test_dir, tmp_path, monkeypatch):
    """Once the new model has decided its first frames, nothing in the station holds the old
    one any more (the run's own first model included): its memory goes back."""
    import gc
    import weakref

    monkeypatch.setattr(updates, "UPDATE_SETTLE_SECONDS", 0.0)
    monkeypatch.setattr(updates, "SCAN_SECONDS", 0.02)
    monkeypatch.setattr(updates, "RELEASE_AFTER", 3)
    first = tiny_bundle[0]
    labels = json.loads((first / "bundle.json").read_text())["metadata"]["labels"]
    watched = tmp_path / "updates"
    watched.mkdir()
    images = [cv2.imread(str(p)) for p in sorted(synth_test_dir.rglob("*.png"))[:4]]
    done = threading.Event()
    log = tmp_path / "log.sqlite"
    handed = [open_checked(first)]
    held = weakref.ref(handed[0])
    options = RunOptions(source=str(tmp_path), log=str(log), pace=30, seconds=300, updates=str(watched),
                         ok_classes=labels[0])
    run = threading.Thread(target=lambda: run_app(handed.pop(), options, opener=lambda info: Frames(images, done),
                                                  load_bundle=open_checked))
    run.start()
    try:
        _drop(second_bundle, watched, "u1", "u1")
        _wait_for_event(log, "product_switch", 60)
        deadline = time.monotonic() + 60
        while held() is not None:
            assert time.monotonic() < deadline, "the first model is still held after the update"
            gc.collect()
            time.sleep(0.1)
        assert run.is_alive()                # still deciding, on the new model
    finally:
        done.set()
        run.join(120)


def test_an_update_asked_for_by_name_is_taken_even_when_it_ran_before(tiny_bundle, second_bundle, tmp_path,
                                                                      monkeypatch):
    """request(name): a bundle folder directly in the watched folder, by its name only (MQTT's
    PREFIX/update, OPC UA's UpdateModel); anything else is refused with an event."""
    from types import SimpleNamespace

    monkeypatch.setattr(updates, "UPDATE_SETTLE_SECONDS", 0.0)
    monkeypatch.setattr(updates, "SCAN_SECONDS", 0.02)
    watched = tmp_path / "updates"
    watched.mkdir()
    _drop(second_bundle, watched, "v2", "v2")
    _drop(tiny_bundle[0], watched, "v1", "v1")
    (watched / "not-a-bundle").mkdir()
    outside = tmp_path / "outside"
    _drop(second_bundle, tmp_path, "outside", "outside")
    (watched / "link").symlink_to(outside)
    taken, events = [], []
    switch = SimpleNamespace(active=SimpleNamespace(model=SimpleNamespace(path=tiny_bundle[0] / "model.xml"),
                                                    name="default"),
                             hint=None, replace=lambda product: taken.append(product.name),
                             release_retired=lambda n: 0)

    def load(path):
        return SimpleNamespace(name=path.name, model=SimpleNamespace(engine=lambda hint: None, checksum="0" * 64),
                               engine=None)

    stop = threading.Event()
    watcher = updates.UpdateWatcher(watched, switch, load, lambda kind, detail: events.append((kind, detail)), stop)
    watcher.start()
    try:
        deadline = time.monotonic() + 20
        while "v2" not in taken:          # both new in one scan: the last takes over, v1 is not even loaded
            assert time.monotonic() < deadline, (taken, events)
            time.sleep(0.02)
        skipped = [d.split(":")[0] for k, d in events if k == "update_skipped"]
        assert taken == ["v2"] and str(watched / "v1") in skipped
        for bad in ("", "..", "../outside", "v1/..", "not-a-bundle", "link", "missing", "a" * 500):
            assert watcher.request(bad) is None
        # (the scan takes what lies in the folder, a link too; a name asked for must be a folder in it)
        assert watcher.request(" v2 ") == "v2"        # seen before: taken again (going back to it)
        assert watcher.request("v1") == "v1"          # skipped by the scan: taken when asked for
        while taken.count("v2") < 2 or "v1" not in taken:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        stop.set()
        watcher.join(5)
    refused = [d for k, d in events if k == "update_refused"]
    assert len(refused) == 8 and watcher.refused == 8
    assert any("not a bundle folder" in d for d in refused) and taken.count("v1") == 1
    assert [k for k, _ in events].count("update_requested") == 2


def test_an_mqtt_message_switches_the_station_to_the_bundle_it_names(tiny_bundle, second_bundle, synth_test_dir,
                                                                     tmp_path, monkeypatch, broker):  # noqa: F811
    """PREFIX/update names a bundle folder in --updates: the decisions after it are the named
    model's; a name outside the folder is refused with an event and the model stays."""
    from test_mqtt import PREFIX, _publish, retained_status

    monkeypatch.setattr(updates, "UPDATE_SETTLE_SECONDS", 3600.0)   # the scan never takes them: only a request
    monkeypatch.setattr(updates, "SCAN_SECONDS", 0.02)
    watched = tmp_path / "updates"
    watched.mkdir()
    _drop(second_bundle, watched, "v2", "v2")
    first = tiny_bundle[0]
    labels = json.loads((first / "bundle.json").read_text())["metadata"]["labels"]
    images = [cv2.imread(str(p)) for p in sorted(synth_test_dir.rglob("*.png"))[:8]]
    done, result, log = threading.Event(), {}, tmp_path / "log.sqlite"
    run = threading.Thread(target=lambda: result.update(run_app(open_checked(first), RunOptions(
        source=str(tmp_path), log=str(log), pace=30, seconds=120, updates=str(watched), mqtt=broker.url,
        ok_classes=labels[0]), opener=lambda info: Frames(images, done), load_bundle=open_checked)))
    run.start()

    try:
        deadline = time.monotonic() + 60
        # the station subscribes before it publishes its status: once that is retained, it listens
        while (retained_status(broker.port).get("status") or {}).get("state") != "online":
            assert time.monotonic() < deadline
        _publish(broker.port, f"{PREFIX}/update", "../outside")
        _publish(broker.port, f"{PREFIX}/update", "v2")
        _wait_for_event(log, "product_switch", 60)
    finally:
        done.set()
        run.join(60)
    with sqlite3.connect(log) as con:
        shas = [s for s, in con.execute("SELECT model_sha256 FROM decisions ORDER BY frame")]
    assert shas[0] == open_checked(first).checksum and shas[-1] == open_checked(second_bundle).checksum
    assert _events(log, "update_refused") == 1 and _events(log, "update_requested") == 1
    assert result["updates"]["loaded"] == 1 and result["updates"]["refused"] == 1


def test_the_opcua_user_updates_the_model_by_name_and_anonymous_clients_may_not(tiny_bundle, second_bundle,
                                                                                synth_test_dir, tmp_path, monkeypatch):
    import asyncio

    from asyncua import Client, ua

    from lineside.runtime.opcua import NAMESPACE
    from opcua_client import free_endpoint, wait_for_server

    monkeypatch.setattr(updates, "UPDATE_SETTLE_SECONDS", 3600.0)   # only a request takes it
    monkeypatch.setattr(updates, "SCAN_SECONDS", 0.02)
    monkeypatch.setenv("LINESIDE_OPCUA_PASSWORD", "s3cret")
    watched = tmp_path / "updates"
    watched.mkdir()
    _drop(second_bundle, watched, "v2", "v2")
    first = tiny_bundle[0]
    labels = json.loads((first / "bundle.json").read_text())["metadata"]["labels"]
    images = [cv2.imread(str(p)) for p in sorted(synth_test_dir.rglob("*.png"))[:4]]
    done, result, log, endpoint = threading.Event(), {}, tmp_path / "log.sqlite", free_endpoint()
    run = threading.Thread(target=lambda: result.update(run_app(open_checked(first), RunOptions(
        source=str(tmp_path), log=str(log), pace=30, seconds=120, updates=str(watched), opcua=endpoint,
        opcua_user="plc", station="station7", ok_classes=labels[0]),
        opener=lambda info: Frames(images, done), load_bundle=open_checked)))
    run.start()

    async def plc():
        await wait_for_server(endpoint)
        async with Client(endpoint) as anon:
            idx = await anon.get_namespace_index(NAMESPACE)
            station = await anon.nodes.objects.get_child([f"{idx}:station7"])
            with pytest.raises(ua.UaStatusCodeError):
                await station.call_method(await station.get_child([f"{idx}:UpdateModel"]), "v2")
        client = Client(endpoint)
        client.set_user("plc")
        client.set_password("s3cret")
        async with client:
            idx = await client.get_namespace_index(NAMESPACE)
            station = await client.nodes.objects.get_child([f"{idx}:station7"])
            method = await station.get_child([f"{idx}:UpdateModel"])
            assert await station.call_method(method, "../v2") == ""
            return await station.call_method(method, "v2")

    try:
        assert asyncio.run(plc()) == "v2"
        _wait_for_event(log, "product_switch", 60)
    finally:
        done.set()
        run.join(60)
    assert result["updates"]["loaded"] == 1 and result["updates"]["refused"] == 1
    assert result["updates"]["model_sha256"] == open_checked(second_bundle).checksum


def test_updates_faster_than_the_release_keep_only_the_model_just_replaced():
    """A burst of updates (each before the previous new model has decided RELEASE_AFTER
    frames) held every replaced model until the burst ended: 100 quick updates of the demo
    bundle held 3.5 GB. Now only the model just replaced waits for its successor's first
    frames; those before it go at the watcher's next call."""
    from types import SimpleNamespace

    from lineside.runtime.products import Product, ProductSwitch

    def product():
        return Product(0, "line", SimpleNamespace(), SimpleNamespace(reset=lambda: None), None, engine=object())

    made = [product()]
    switch = ProductSwitch([made[0]])
    for _ in range(10):                      # 10 updates, 2 frames apart: none reaches 30 frames
        made.append(product())
        switch.replace(made[-1])
        taken, _ = switch.take()
        switch.switched(taken)
        switch.decided()
        switch.decided()
        switch.release_retired(30)
    assert switch.active is made[-1] and switch.retired == [made[-2]]
    assert all(p.model is None and p.engine is None for p in made[:-2])     # released
    assert made[-2].model is not None and made[-1].model is not None
    for _ in range(28):
        switch.decided()
    assert switch.release_retired(30) == 1 and made[-2].model is None and switch.retired == []
    assert made[-1].model is not None and switch.release_retired(30) == 0
