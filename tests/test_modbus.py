"""The PLC handshake over Modbus TCP (pymodbus, `[modbus]`), driven by pymodbus's own client
and by Debian's mbpoll (a Modbus client nobody here wrote): ready, trigger, result,
acknowledgement, a trigger while a result waits, a timeout, writes the PLC may not make,
the allow-list, and a station restarting while the PLC polls."""

import os
import shutil
import socket
import sqlite3
import subprocess
import threading
import time

import pytest

from lineside.errors import LinesideError
from lineside.runtime import modbus as mb
from lineside.runtime.app import RunOptions, run_app
from lineside.runtime.model import open_model
from lineside.runtime.trigger import Triggers
from lineside.video import write_video

pytest.importorskip("pymodbus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Plc:
    """A PLC's side of the handshake, over pymodbus's client."""

    def __init__(self, port: int):
        from pymodbus.client import ModbusTcpClient

        self.client = ModbusTcpClient("127.0.0.1", port=port, timeout=5)
        deadline = time.monotonic() + 30
        while not self.client.connect():
            assert time.monotonic() < deadline, "the station's Modbus server never answered"
            time.sleep(0.1)

    def read(self, address: int, count: int = 1) -> list[int]:
        r = self.client.read_holding_registers(address, count=count)
        assert not r.isError(), r
        return list(r.registers)

    def write(self, address: int, values) -> bool:
        r = self.client.write_registers(address, list(values))
        return not r.isError()

    def wait(self, bit: int, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.read(mb.STATUS)[0] & bit:
                return True
            time.sleep(0.005)
        return False

    def counter(self, reg: int) -> int:
        hi, lo = self.read(reg, 2)
        return hi << 16 | lo

    def close(self):
        self.client.close()


@pytest.fixture(scope="module")
def video(synth_test_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("modbus_video") / "parts.avi"
    write_video(synth_test_dir, out, size=(160, 120), hold=2)
    return out


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return open_model(tiny_bundle[0], backend="openvino")


def _station(model, video, tmp_path, port, **kw):
    result = {}
    options = dict(source=str(video), log=str(tmp_path / "log.sqlite"), pace=30, loop=True, seconds=12,
                   modbus=f"127.0.0.1:{port}", trigger="modbus", ok_classes=model.labels[0],
                   trigger_timeout_ms=1000)
    options.update(kw)
    thread = threading.Thread(target=lambda: result.update(run_app(model, RunOptions(**options))))
    thread.start()
    return thread, result


def test_the_handshake_over_modbus(model, video, tmp_path):
    port = free_port()
    thread, result = _station(model, video, tmp_path, port)
    plc = Plc(port)
    try:
        assert plc.read(mb.MAP_VERSION_REG) == [1]
        beat = plc.read(mb.HEARTBEAT)[0]
        assert plc.wait(mb.READY) and plc.wait(mb.SOURCE_LIVE)
        time.sleep(0.35)
        assert plc.read(mb.HEARTBEAT)[0] != beat                      # the station is alive
        # trigger part 70001 (two registers, high word first)
        assert plc.write(mb.PART_NUMBER, [70001 >> 16, 70001 & 0xFFFF])
        assert plc.write(mb.TRIGGER, [1])
        assert plc.wait(mb.RESULTS_READY)
        status, _, error, product, outcome, cls, conf, anomaly, reason, seq, p_hi, p_lo = plc.read(mb.STATUS, 12)
        assert not status & mb.READY and not status & mb.BUSY and error == 0
        assert outcome in (1, 2) and reason == 1 and seq == 1 and (p_hi << 16 | p_lo) == 70001
        assert cls < len(model.labels) and 0 <= conf <= 1000 and anomaly == 0xFFFF
        assert plc.read(mb.TRIGGER) == [0]                             # cleared by the station
        assert 0 < plc.read(mb.LAST_PROCESSING)[0] <= plc.read(mb.MAX_PROCESSING)[0]
        # a trigger while the result waits for its acknowledgement: counted, flagged, never queued
        assert plc.write(mb.TRIGGER, [1])
        assert plc.read(mb.ERROR_CODE) == [mb.ERROR_TRIGGER_NOT_READY] and plc.counter(mb.TRIGGER_ERRORS) == 1
        assert plc.read(mb.STATUS)[0] & mb.ERROR and plc.read(mb.RESULT_SEQUENCE) == [1]
        # acknowledged: ready again, and the next trigger clears the error
        assert plc.write(mb.RESULTS_ACK, [1])
        assert plc.wait(mb.READY) and not plc.read(mb.STATUS)[0] & mb.RESULTS_READY
        assert plc.write(mb.PART_NUMBER, [0, 0]) and plc.write(mb.TRIGGER, [1])
        assert plc.wait(mb.RESULTS_READY) and plc.read(mb.RESULT_SEQUENCE) == [2]
        assert plc.read(mb.ERROR_CODE) == [0]
        ok, ng = plc.counter(mb.OK_COUNT), plc.counter(mb.NG_COUNT)
        assert ok + ng == 2 and plc.counter(mb.FRAMES_DECIDED) > 10
        # writes the PLC may not make: station-owned registers, a span reaching into them, coils
        before = plc.read(mb.RESULT_OUTCOME)[0]
        assert not plc.write(mb.RESULT_OUTCOME, [3 - before]) and plc.read(mb.RESULT_OUTCOME)[0] == before
        assert not plc.write(98, [0, 0, 1]) and plc.read(mb.TRIGGER) == [0]
        assert plc.client.write_coil(0, True).isError()
        assert plc.client.read_holding_registers(mb.REGISTERS, count=1).isError()   # outside the map
    finally:
        plc.close()
        thread.join(60)
    assert result["answers"] == {"decided": 2} and result["modbus_trigger_errors"] == 1
    assert result["modbus_refused_writes"] == 2
    with sqlite3.connect(tmp_path / "log.sqlite") as con:
        parts = [r[0] for r in con.execute("SELECT part_id FROM decisions WHERE part_id IS NOT NULL")]
    assert "70001" in parts and len(parts) == 2


def test_no_frame_in_time_is_a_fail_safe_ng_over_modbus(model, tmp_path):
    """The camera is gone: the trigger is answered NG with reason no_frame within the timeout."""
    port = free_port()
    thread, result = _station(model, "rtsp://127.0.0.1:9/none", tmp_path, port, pace=None, loop=False,
                              seconds=5, trigger_timeout_ms=500)
    plc = Plc(port)
    try:
        assert plc.wait(mb.READY)
        t0 = time.monotonic()
        plc.write(mb.TRIGGER, [1])
        assert plc.wait(mb.RESULTS_READY, timeout=5)
        waited = time.monotonic() - t0
        outcome, cls, _, _, reason = plc.read(mb.RESULT_OUTCOME, 5)
        assert (outcome, cls, reason) == (2, 0xFFFF, mb.REASON_CODES["no_frame"]) and 0.4 < waited < 3.0
        assert plc.counter(mb.TIMEOUTS) == 1 and plc.counter(mb.NG_COUNT) == 1
    finally:
        plc.close()
        thread.join(60)


def test_the_allow_list_refuses_other_clients(model, video, tmp_path):
    from pymodbus.client import ModbusTcpClient

    port = free_port()
    thread, result = _station(model, video, tmp_path, port, seconds=4, modbus_allow="10.9.9.9")
    try:
        time.sleep(1.5)
        client = ModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
        client.connect()
        with pytest.raises(Exception):
            r = client.read_holding_registers(0, count=1)
            assert r.isError()
            raise AssertionError("read refused")
        client.close()
    finally:
        thread.join(60)
    assert result["modbus_refused_clients"] >= 1


def test_modbus_options_are_checked():
    assert mb.parse_modbus_address("5020") == ("127.0.0.1", 5020)
    assert mb.parse_modbus_address("0.0.0.0:502") == ("0.0.0.0", 502)
    with pytest.raises(LinesideError, match="--modbus x:y"):
        mb.parse_modbus_address("x:y")
    with pytest.raises(LinesideError, match="--modbus-allow: 'nope'"):
        mb.parse_allow("10.0.0.1,nope")
    assert mb.words32(70001) == [1, 4465] and mb.words32(-3) == [0, 0] and mb.words32(2**40) == [0xFFFF, 0xFFFF]

def test_trigger_modbus_needs_the_server(model, video):
    with pytest.raises(LinesideError, match="--trigger modbus: needs --modbus"):
        run_app(model, RunOptions(source=str(video), trigger="modbus", ok_classes=model.labels[0]))


def test_the_register_map_alone():
    """The handshake without a network: the map's rules, each transition."""
    answers = []
    triggers = Triggers(5.0, on_answer=lambda a: (answers.append(a), regs.answer(a)))
    regs = mb.RegisterMap(triggers, ["ok", "scratch"])
    assert regs.read(mb.STATUS, 1) == [mb.READY]
    assert regs.write(mb.TRIGGER, [1]) and regs.read(mb.STATUS, 1) == [mb.BUSY]
    assert not regs.write(mb.STATUS, [mb.READY]) and not regs.write(99, [0, 1])
    triggers.offer(time.perf_counter(), "scratch", "NG", 0.87)
    assert regs.read(mb.STATUS, 1) == [mb.RESULTS_READY]
    assert regs.read(mb.RESULT_OUTCOME, 3) == [2, 1, 870]
    regs.write(mb.TRIGGER, [1])
    assert regs.counter(mb.TRIGGER_ERRORS) == 1 and regs.read(mb.ERROR_CODE, 1) == [1]
    regs.write(mb.ERROR_RESET, [1])
    assert regs.read(mb.ERROR_CODE, 1) == [0] and regs.read(mb.ERROR_RESET, 1) == [0]
    regs.write(mb.RESULTS_ACK, [1])
    assert regs.read(mb.STATUS, 1) == [mb.READY] and regs.read(mb.RESULTS_ACK, 1) == [0]
    triggers.close()


# --- Debian's mbpoll ------------------------------------------------------------------------

def _mbpoll(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["mbpoll", "-m", "tcp", "-0", "-1", "-t", "4", *args], capture_output=True,
                          text=True, timeout=30)


def test_mbpoll_drives_the_handshake(model, video, tmp_path):
    if shutil.which("mbpoll") is None:
        if os.environ.get("LINESIDE_REQUIRE_MBPOLL"):
            pytest.fail("mbpoll is required here (LINESIDE_REQUIRE_MBPOLL) but not installed")
        pytest.skip("no mbpoll: apt-get install mbpoll")
    port = free_port()
    thread, result = _station(model, video, tmp_path, port)
    try:
        Plc(port).close()     # the server answers
        read = _mbpoll("-r", "0", "-c", "3", "-p", str(port), "127.0.0.1")
        assert read.returncode == 0, read.stderr
        assert _value(read.stdout) == "1"                                   # MapVersion
        deadline = time.monotonic() + 10
        while not (int(_value(_mbpoll("-r", "2", "-c", "1", "-p", str(port), "127.0.0.1").stdout)) & mb.READY):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        wrote = _mbpoll("-r", "100", "-p", str(port), "127.0.0.1", "1")          # Trigger = 1
        assert wrote.returncode == 0, wrote.stderr + wrote.stdout
        deadline = time.monotonic() + 10
        while not int(_value(_mbpoll("-r", "2", "-c", "1", "-p", str(port), "127.0.0.1").stdout)) & mb.RESULTS_READY:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert int(_value(_mbpoll("-r", "11", "-c", "1", "-p", str(port), "127.0.0.1").stdout)) == 1
        refused = _mbpoll("-r", "6", "-p", str(port), "127.0.0.1", "1")          # a result register
        assert refused.returncode != 0 or "Illegal data address" in refused.stdout + refused.stderr
        assert _mbpoll("-r", "101", "-p", str(port), "127.0.0.1", "1").returncode == 0   # ResultsAck
        deadline = time.monotonic() + 10
        while not int(_value(_mbpoll("-r", "2", "-c", "1", "-p", str(port), "127.0.0.1").stdout)) & mb.READY:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        thread.join(60)
    assert result["answers"] == {"decided": 1}


def _value(out: str) -> str:
    """The value of mbpoll's one register line, '[2]: \t1'."""
    for line in out.splitlines():
        if line.strip().startswith("[") and "]:" in line:
            return line.split("]:", 1)[1].strip()
    raise AssertionError(f"no register in mbpoll's output: {out!r}")


def test_the_station_restarting_while_the_plc_polls(model, video, tmp_path):
    """The PLC polls through a restart: the heartbeat stops and reads fail while the station
    is gone; the new station answers on the same port, Ready, its ResultSequence from 0."""
    port = free_port()
    thread, _ = _station(model, video, tmp_path, port, seconds=3)
    plc = Plc(port)
    assert plc.wait(mb.READY)
    plc.write(mb.TRIGGER, [1])
    assert plc.wait(mb.RESULTS_READY) and plc.read(mb.RESULT_SEQUENCE) == [1]
    thread.join(60)                                       # the station stops
    from pymodbus.exceptions import ModbusException

    with pytest.raises(ModbusException):          # the PLC's poll fails while the station is gone
        plc.client.read_holding_registers(mb.HEARTBEAT, count=1)
    plc.close()
    thread, _ = _station(model, video, tmp_path, port, seconds=3, log=str(tmp_path / "log2.sqlite"))
    plc = Plc(port)                                       # the PLC reconnects
    try:
        assert plc.wait(mb.READY) and plc.read(mb.RESULT_SEQUENCE) == [0]
        assert not plc.read(mb.STATUS)[0] & mb.RESULTS_READY
    finally:
        plc.close()
        thread.join(60)
