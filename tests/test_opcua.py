"""The station over OPC UA (asyncua, `[opcua]`): a client reads and subscribes while a run
goes on, anonymous clients cannot write or trigger, and the user's Trigger(PartId) is
answered with that part id in OPC UA and in the log."""

import asyncio
import json
import socket
import sqlite3
import threading

import pytest

from lineside.errors import LinesideError
from lineside.runtime.app import RunOptions, run_app
from lineside.runtime.model import open_model
from lineside.runtime.opcua import NAMESPACE, check_endpoint
from lineside.video import write_video


def test_opcua_endpoints_are_checked():
    assert check_endpoint("opc.tcp://127.0.0.1:4841") == ("127.0.0.1", 4841)
    with pytest.raises(LinesideError, match="--opcua"):
        check_endpoint("http://127.0.0.1:4840")


def test_a_plc_reads_subscribes_and_triggers_over_opcua(tiny_bundle, synth_test_dir, tmp_path, monkeypatch):
    from asyncua import Client, ua

    video = tmp_path / "parts.avi"
    write_video(synth_test_dir, video, size=(160, 120), hold=2)
    model = open_model(tiny_bundle[0], backend="openvino")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"opc.tcp://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("LINESIDE_OPCUA_PASSWORD", "s3cret")
    db = tmp_path / "log.sqlite"
    result = {}
    run = threading.Thread(target=lambda: result.update(run_app(model, RunOptions(
        source=str(video), log=str(db), pace=30, loop=True, seconds=10, opcua=endpoint, opcua_user="plc",
        trigger="opcua", station="station7", ok_classes=model.labels[0]))))
    run.start()

    async def plc():
        seen = {}
        for _ in range(100):                       # the server starts with the run
            try:
                async with Client(endpoint):
                    break
            except (OSError, asyncio.TimeoutError, ua.UaError):
                await asyncio.sleep(0.1)
        async with Client(endpoint) as anon:
            idx = await anon.get_namespace_index(NAMESPACE)
            station = await anon.nodes.objects.get_child([f"{idx}:station7"])
            counter = await station.get_child([f"{idx}:ResultCounter"])
            changes = []

            class Handler:
                def datachange_notification(self, node, val, data):
                    changes.append(val)

            sub = await anon.create_subscription(50, Handler())
            await sub.subscribe_data_change(counter)
            await asyncio.sleep(2.0)
            seen["changes"] = list(changes)
            seen["label"] = await (await station.get_child([f"{idx}:LastLabel"])).read_value()
            trigger = await station.get_child([f"{idx}:Trigger"])
            with pytest.raises(ua.UaStatusCodeError):
                await station.call_method(trigger, "X-0")            # anonymous: refused
            with pytest.raises(ua.UaStatusCodeError):
                await (await station.get_child([f"{idx}:LastLabel"])).write_value("forged")
        user = Client(endpoint)
        user.set_user("plc")
        user.set_password("s3cret")
        async with user:
            idx = await user.get_namespace_index(NAMESPACE)
            station = await user.nodes.objects.get_child([f"{idx}:station7"])
            trigger = await station.get_child([f"{idx}:Trigger"])
            seen["returned"] = await station.call_method(trigger, "C-5")
            answer = await station.get_child([f"{idx}:LastAnswer"])
            for _ in range(50):
                text = await answer.read_value()
                if text and json.loads(text)["part_id"] == "C-5":
                    seen["answer"] = json.loads(text)
                    break
                await asyncio.sleep(0.1)
        return seen

    seen = asyncio.run(plc())
    run.join(60)
    assert len(seen["changes"]) >= 10 and seen["changes"] == sorted(seen["changes"])   # every new result
    assert seen["label"] in model.labels + ["unknown"]
    assert seen["returned"] == "C-5"
    assert seen["answer"]["reason"] == "decided" and seen["answer"]["verdict"] in ("OK", "NG")
    rows = sqlite3.connect(db).execute("SELECT label FROM decisions WHERE part_id = 'C-5'").fetchall()
    assert len(rows) == 1 and rows[0][0] == seen["answer"]["label"]
    assert result["answers"] == {"decided": 1}


def test_an_opcua_trigger_needs_a_user():
    from lineside.runtime.opcua import OpcUaOutput

    with pytest.raises(LinesideError, match="--trigger opcua: needs --opcua-user"):
        OpcUaOutput("opc.tcp://127.0.0.1:1", "s", "x", ["a"], on_trigger=lambda p: p)
