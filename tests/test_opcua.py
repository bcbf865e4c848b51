"""The station over OPC UA (asyncua, `[opcua]`): a client reads and subscribes while a run
goes on, anonymous clients cannot write or trigger, and the user's Trigger(PartId) is
answered with that part id in OPC UA and in the log."""

import asyncio
import logging
import sqlite3
import threading

import pytest

from lineside.errors import LinesideError
from lineside.runtime.app import RunOptions, run_app
from lineside.runtime.model import open_model
from lineside.runtime.opcua import NAMESPACE, check_endpoint
from lineside.video import write_video
from opcua_client import free_endpoint, trigger_and_wait, wait_for_server


def test_opcua_endpoints_are_checked():
    assert check_endpoint("opc.tcp://127.0.0.1:4841") == ("127.0.0.1", 4841)
    with pytest.raises(LinesideError, match="--opcua"):
        check_endpoint("http://127.0.0.1:4840")


def test_a_plc_reads_subscribes_and_triggers_over_opcua(tiny_bundle, synth_test_dir, tmp_path, monkeypatch,
                                                        caplog):
    from asyncua import Client, ua

    caplog.set_level(logging.INFO)

    video = tmp_path / "parts.avi"
    roi = ",".join(map(str, write_video(synth_test_dir, video, size=(160, 120), hold=2)["roi"]))
    model = open_model(tiny_bundle[0], backend="openvino")
    endpoint = free_endpoint()
    monkeypatch.setenv("LINESIDE_OPCUA_PASSWORD", "s3cret")
    db = tmp_path / "log.sqlite"
    result = {}
    run = threading.Thread(target=lambda: result.update(run_app(model, RunOptions(
        source=str(video), log=str(db), pace=30, loop=True, seconds=10, opcua=endpoint, opcua_user="plc", roi=roi,
        trigger="opcua", station="station7", ok_classes=model.labels[0]))))
    run.start()

    async def plc():
        seen = {}
        await wait_for_server(endpoint)
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
        seen["returned"], seen["answer"] = await trigger_and_wait(endpoint, "station7", "C-5", "plc", "s3cret")
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
    # refused anonymous requests are the server working, and a part answer is no fault: no ERROR, no WARNING
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not loud, [r.getMessage() for r in loud]


def test_an_opcua_user_without_a_password_is_a_setup_error(monkeypatch):
    """Before, `plc` then logged in with an empty password, with more rights than anonymous."""
    from lineside.runtime.opcua import OpcUaOutput

    monkeypatch.delenv("LINESIDE_OPCUA_PASSWORD", raising=False)
    with pytest.raises(LinesideError, match="--opcua-user plc: set its password"):
        OpcUaOutput(free_endpoint(), "s", "x", ["a", "b"], user="plc")
    monkeypatch.setenv("LINESIDE_OPCUA_PASSWORD", "")
    with pytest.raises(LinesideError, match="--opcua-user plc: set its password"):
        OpcUaOutput(free_endpoint(), "s", "x", ["a", "b"], user="plc")


def test_an_opcua_trigger_needs_a_user():
    from lineside.runtime.opcua import OpcUaOutput

    with pytest.raises(LinesideError, match="--trigger opcua: needs --opcua-user"):
        OpcUaOutput("opc.tcp://127.0.0.1:1", "s", "x", ["a"], on_trigger=lambda p: p)


def _certificate(folder, name: str):
    """A self-signed application certificate (DER) and its key (PEM), as asyncua makes them."""
    from asyncua.crypto import cert_gen
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = cert_gen.generate_private_key()
    cert = cert_gen.generate_self_signed_app_certificate(
        key, name, {"commonName": name}, [x509.UniformResourceIdentifier(f"urn:lineside:test:{name}"),
                                          x509.DNSName("localhost")],
        extended=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    cert_path, key_path = folder / f"{name}.der", folder / f"{name}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    return cert_path, key_path


def test_with_a_certificate_the_endpoint_is_encrypted_only(tmp_path, monkeypatch):
    """--opcua-cert/--opcua-key: only Basic256Sha256 is offered; a client without it is
    refused, one with it reads the station and its user logs in (the password encrypted)."""
    from asyncua import Client, ua
    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

    from lineside.runtime.opcua import OpcUaOutput

    server_cert, server_key = _certificate(tmp_path, "station")
    client_cert, client_key = _certificate(tmp_path, "plc")
    endpoint = free_endpoint()
    with pytest.raises(LinesideError, match="give both"):
        OpcUaOutput(endpoint, "s", "x", ["a"], cert=str(server_cert))
    with pytest.raises(LinesideError, match="--opcua-key .*no such file"):
        OpcUaOutput(endpoint, "s", "x", ["a"], cert=str(server_cert), key=str(tmp_path / "missing.pem"))
    out = OpcUaOutput(endpoint, "station7", "abc123", ["a", "b"], user="plc", password="s3cret",
                      cert=str(server_cert), key=str(server_key))

    async def clients():
        plain = Client(endpoint)
        with pytest.raises(Exception):      # no endpoint without security: the session is refused
            await plain.connect()
            await plain.disconnect()
        endpoints = await Client(endpoint).connect_and_get_server_endpoints()
        assert {e.SecurityPolicyUri.rsplit("#", 1)[-1] for e in endpoints} == {"Basic256Sha256"}
        assert {e.SecurityMode for e in endpoints} == {ua.MessageSecurityMode.SignAndEncrypt,
                                                       ua.MessageSecurityMode.Sign}
        for user in (None, "plc"):
            client = Client(endpoint)
            if user:
                client.set_user(user)
                client.set_password("s3cret")
            await client.set_security(SecurityPolicyBasic256Sha256, certificate=str(client_cert),
                                      private_key=str(client_key), server_certificate=str(server_cert),
                                      mode=ua.MessageSecurityMode.SignAndEncrypt)
            async with client:
                idx = await client.get_namespace_index(NAMESPACE)
                station = await client.nodes.objects.get_child([f"{idx}:station7"])
                assert await (await station.get_child([f"{idx}:ModelSha256"])).read_value() == "abc123"

    try:
        asyncio.run(clients())
    finally:
        out.close(None)


def test_the_user_switches_the_product_over_opcua(tiny_bundle, synth_test_dir, tmp_path, monkeypatch):
    """SetProduct(name or index): the user's call switches products (the Product variable and
    the log follow); an anonymous call is refused; an unknown name returns ''."""
    import cv2
    from asyncua import Client, ua

    from lineside.runtime.app import make_decider
    from lineside.runtime.products import open_products
    from test_products import Frames

    bundle = tiny_bundle[0]
    products_file = tmp_path / "products.yaml"
    products_file.write_text(f"products:\n  - name: a\n    bundle: {bundle}\n  - name: b\n    bundle: {bundle}\n")
    products = open_products(products_file, "openvino", "fp32", "CPU", None, open_model, make_decider)
    images = [cv2.imread(str(p)) for p in sorted(synth_test_dir.rglob("*.png"))[:4]]
    done = threading.Event()
    endpoint = free_endpoint()
    monkeypatch.setenv("LINESIDE_OPCUA_PASSWORD", "s3cret")
    db = tmp_path / "log.sqlite"
    result = {}
    run = threading.Thread(target=lambda: result.update(run_app(None, RunOptions(
        source=str(tmp_path), log=str(db), pace=30, seconds=120, opcua=endpoint, opcua_user="plc",
        station="station7"), products=products, opener=lambda info: Frames(images, done))))
    run.start()

    async def plc():
        await wait_for_server(endpoint)
        async with Client(endpoint) as anon:
            idx = await anon.get_namespace_index(NAMESPACE)
            station = await anon.nodes.objects.get_child([f"{idx}:station7"])
            with pytest.raises(ua.UaStatusCodeError):
                await station.call_method(await station.get_child([f"{idx}:SetProduct"]), "b")
        client = Client(endpoint)
        client.set_user("plc")
        client.set_password("s3cret")
        async with client:
            idx = await client.get_namespace_index(NAMESPACE)
            station = await client.nodes.objects.get_child([f"{idx}:station7"])
            method = await station.get_child([f"{idx}:SetProduct"])
            product = await station.get_child([f"{idx}:Product"])

            async def shows(name):
                for _ in range(400):
                    if await product.read_value() == name:
                        return True
                    await asyncio.sleep(0.05)
                return False

            assert await shows("a")                       # the first product decides
            assert await station.call_method(method, "nope") == ""
            assert await station.call_method(method, "1") == "b"
            return await shows("b")

    try:
        assert asyncio.run(plc())
    finally:
        done.set()
        run.join(60)
    assert result["products"] == {"active": "b", "switches": 1, "refused": 1}
    logged = {p for p, in sqlite3.connect(db).execute("SELECT product FROM decisions")}
    assert logged == {"a", "b"}
