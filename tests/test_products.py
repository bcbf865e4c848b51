"""Product changeover: several bundles on one station, switched between two frames by the
line (Modbus ProductRequest, MQTT, the page), with every decision attributed to the product
whose model and settings made it."""

import json
import sqlite3
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from lineside.cli import main
from lineside.errors import LinesideError
from lineside.runtime.app import RunOptions, make_decider, run_app
from lineside.runtime.model import open_model
from lineside.runtime.products import open_products, read_products
from lineside.runtime.trigger import Triggers


def _products_file(folder: Path, bundle: Path, labels) -> Path:
    path = folder / "products.yaml"
    path.write_text(f"""products:
  - name: housing-a
    bundle: {bundle}
    ok_classes: {labels[0]}
  - name: housing-b
    bundle: {bundle}
    ok_classes: {labels[1]}
    roi: 0,0,60,60
""")
    return path


class Frames:
    """A paced source of a few real images that ends when `done` is set."""

    fps = None

    def __init__(self, images, done: threading.Event):
        self.images, self.done, self.i = images, done, 0

    def read(self):
        if self.done.is_set():
            return None, ""
        self.i += 1
        return self.images[self.i % len(self.images)], f"f{self.i}"

    def release(self):
        pass


def test_a_products_file_is_checked(tmp_path, tiny_bundle):
    bundle, _ = tiny_bundle
    bad = tmp_path / "bad.yaml"
    for text, needle in [("products: []", "needs a list 'products:'"),
                         ("products:\n  - name: a\n", "product 0 (a): needs a bundle"),
                         (f"products:\n  - name: a\n    bundle: {bundle}\n  - name: a\n    bundle: {bundle}\n",
                          "product 1: needs a name of its own"),
                         (f"products:\n  - name: a\n    bundle: {bundle}\n    threshold: 3\n", "product 0: unknown key(s) threshold"),
                         ("products: [", "cannot be read")]:
        bad.write_text(text)
        with pytest.raises(LinesideError, match=r"--products .*bad.yaml: " + needle.replace("(", r"\(").replace(")", r"\)")):
            read_products(bad)
    bad.write_text(f"products:\n  - name: a\n    bundle: {bundle}\n    ok_classes: nosuchclass\n")
    with pytest.raises(LinesideError, match="product a: --ok-classes: nosuchclass not among"):
        open_products(bad, "openvino", "fp32", "CPU", None, open_model, make_decider)


def test_a_waiting_trigger_is_answered_by_the_new_product_only():
    got = []
    t = Triggers(5.0, frames=2, votes=2, on_answer=got.append)
    t.request("P-1")
    t.offer(time.perf_counter(), "a", "OK", 0.9)         # the old product's frame...
    t.restart(time.perf_counter())                       # ...forgotten at the switch
    t.offer(time.perf_counter(), "b", "NG", 0.8)
    assert not got
    t.offer(time.perf_counter(), "b", "NG", 0.7)
    t.close()
    assert got[0].label == "b" and got[0].frames == 2 and got[0].reason == "decided"


def test_100_switches_under_a_30_fps_stream_lose_and_misattribute_nothing(tiny_bundle, synth_test_dir, tmp_path):
    """The PLC switches products over Modbus 100 times while frames come at 30 FPS; every
    frame read is decided and logged once, by the product active when it was taken, with
    that product's OK classes; each switch is an event; an unknown index is refused."""
    pytest.importorskip("pymodbus")
    from test_modbus import Plc, free_port

    from lineside.runtime import modbus as mb

    bundle, _ = tiny_bundle
    labels = json.loads((bundle / "bundle.json").read_text())["metadata"]["labels"]
    products = open_products(_products_file(tmp_path, bundle, labels), "openvino", "fp32", "CPU", None,
                             open_model, make_decider)
    ok = {"housing-a": labels[0], "housing-b": labels[1]}
    images = [cv2.resize(cv2.imread(str(p)), (160, 120)) for p in sorted(synth_test_dir.rglob("*.png"))[:12]]
    done = threading.Event()
    port = free_port()
    log = tmp_path / "log.sqlite"
    result = {}
    run = threading.Thread(target=lambda: result.update(run_app(None, RunOptions(
        source=str(tmp_path), log=str(log), pace=30, modbus=f"127.0.0.1:{port}", seconds=120),
        opener=lambda info: Frames(images, done), products=products)))
    run.start()
    plc = Plc(port)
    try:
        assert plc.wait(mb.SOURCE_LIVE)
        assert plc.write(mb.PRODUCT_REQUEST, [7])                  # no such product: refused, flagged
        deadline = time.monotonic() + 10
        while plc.read(mb.ERROR_CODE) != [mb.ERROR_UNKNOWN_PRODUCT]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert plc.read(mb.ACTIVE_PRODUCT) == [0]
        for k in range(100):
            want = (k + 1) % 2
            assert plc.write(mb.PRODUCT_REQUEST, [want])
            deadline = time.monotonic() + 10
            while plc.read(mb.ACTIVE_PRODUCT) != [want]:
                assert time.monotonic() < deadline, f"switch {k} never happened"
                time.sleep(0.002)
            time.sleep(0.03)          # a frame or two by each product
    finally:
        done.set()
        plc.close()
        run.join(60)
    assert result["products"]["switches"] == 100 and result["products"]["refused"] == 1
    assert result["frames"] == result["frames_read"] == result["logged"] and result["not_logged"] == 0
    with sqlite3.connect(log) as con:
        rows = con.execute("SELECT frame, product, label, verdict FROM decisions ORDER BY frame").fetchall()
        kinds = [k for k, in con.execute("SELECT kind FROM events")]
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1))       # every frame once, in order
    for frame, product, label, verdict in rows:
        assert verdict == ("OK" if label == ok[product] else "NG"), (frame, product, label, verdict)
    runs = [rows[0][1]] + [b[1] for a, b in zip(rows, rows[1:]) if a[1] != b[1]]
    assert len(runs) >= 90 and kinds.count("product_switch") == 100 and kinds.count("product_refused") == 1


def test_run_cli_takes_a_products_file_and_refuses_a_bundle_beside_it(tiny_bundle, synth_test_dir, tmp_path):
    bundle, _ = tiny_bundle
    labels = json.loads((bundle / "bundle.json").read_text())["metadata"]["labels"]
    products = _products_file(tmp_path, bundle, labels)
    folder = synth_test_dir / "hat"
    res = CliRunner().invoke(main, ["run", "--products", str(products), "--product", "housing-b", "--source",
                                    str(folder), "--log", str(tmp_path / "log.jsonl"), "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["products"] == {"active": "housing-b", "switches": 0, "refused": 0}
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert {x["product"] for x in lines if x["type"] == "decision"} == {"housing-b"}
    res = CliRunner().invoke(main, ["run", str(bundle), "--products", str(products), "--source", str(folder)])
    assert res.exit_code == 2 and "either BUNDLE or --products" in res.output
    res = CliRunner().invoke(main, ["run", "--products", str(products), "--roi", "0,0,9,9", "--source", str(folder)])
    assert res.exit_code == 2 and "--roi: with --products" in res.output
