#!/usr/bin/env python
"""The PLC handshake over Modbus TCP on loopback, measured as a PLC sees it.

    python benchmarks/modbus_handshake.py demo-out/bundle demo-out/parts.avi --triggers 1000 \
        --roi 80,0,480,480 --out modbus.json

1. Trigger to ResultsReady: a PLC (pymodbus's client, polling Status as fast as it
   answers) writes Trigger, waits for ResultsReady, reads the result and writes
   ResultsAck, --triggers times, while the station runs the video at 30 FPS. Reported:
   p50, p99 and max of the PLC's own clock from its Trigger write to ResultsReady seen.
2. The camera loop with and without Modbus: `--seconds` at 30 FPS with no server, then
   with the server and a PLC reading the whole map every 10 ms; FPS, capture-to-decision
   p50/p99 and dropped frames of each, from the run's own summary.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

from lineside.runtime import modbus as mb
from lineside.runtime.app import RunOptions, run_app
from lineside.runtime.model import open_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(port: int):
    from pymodbus.client import ModbusTcpClient

    c = ModbusTcpClient("127.0.0.1", port=port, timeout=5)
    deadline = time.monotonic() + 30
    while not c.connect():
        if time.monotonic() > deadline:
            sys.exit("the station's Modbus server never answered")
        time.sleep(0.1)
    return c


def status(c) -> int:
    return c.read_holding_registers(mb.STATUS, count=1).registers[0]


def station(model, args, port: int | None, seconds: float, **kw):
    result = {}
    options = RunOptions(source=args.video, log=None, pace=30, loop=True, seconds=seconds, roi=args.roi,
                         ok_classes=model.labels[0], modbus=f"127.0.0.1:{port}" if port else None, **kw)
    thread = threading.Thread(target=lambda: result.update(run_app(model, options)))
    thread.start()
    return thread, result


def handshake(model, args) -> dict:
    port = free_port()
    thread, result = station(model, args, port, seconds=args.triggers * 0.2 + 60, trigger="modbus",
                             trigger_timeout_ms=1000)
    c = client(port)
    while not status(c) & mb.READY:
        time.sleep(0.01)
    times, reasons = [], []
    for _ in range(args.triggers):
        t0 = time.perf_counter()
        c.write_register(mb.TRIGGER, 1)
        while not status(c) & mb.RESULTS_READY:
            pass
        times.append((time.perf_counter() - t0) * 1000)
        reasons.append(c.read_holding_registers(mb.RESULT_REASON, count=1).registers[0])
        c.write_register(mb.RESULTS_ACK, 1)
        while not status(c) & mb.READY:
            pass
    c.close()
    thread.join()       # ends at --seconds
    t = np.array(times)
    return {"triggers": len(t), "p50_ms": round(float(np.percentile(t, 50)), 2),
            "p99_ms": round(float(np.percentile(t, 99)), 2), "max_ms": round(float(t.max()), 2),
            "decided": int(sum(r == mb.REASON_CODES["decided"] for r in reasons)), "answers": result.get("answers")}


def loop_with_polling(model, args) -> dict:
    out = {}
    for name, port in (("without_modbus", None), ("with_modbus_polled_every_10ms", free_port())):
        thread, result = station(model, args, port, seconds=args.seconds)
        polls = 0
        if port:
            c = client(port)
            while thread.is_alive():
                c.read_holding_registers(0, count=36)
                polls += 1
                time.sleep(0.01)
            c.close()
        thread.join()
        out[name] = {"fps": result["fps"], "p50_ms": result["latency_ms"]["p50"],
                     "p99_ms": result["latency_ms"]["p99"], "dropped": result["dropped"], "polls": polls}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("video")
    parser.add_argument("--roi", default=None)
    parser.add_argument("--triggers", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model = open_model(args.bundle)
    report = {"handshake": handshake(model, args)}
    print(json.dumps(report["handshake"]), flush=True)
    report["loop"] = loop_with_polling(model, args)
    print(json.dumps(report["loop"]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
