"""The PLC handshake over Modbus TCP: `lineside run ... --modbus [HOST:]PORT --trigger modbus`.

A server in the station (pymodbus, `[modbus]`) holds one register map, version 1, that
a PLC programmer wires up as they would a smart camera's: holding registers, read with
function 3 (or 4: the same map as input registers), written with 6 or 16. Addresses
are 0-based (a PLC that counts from 40001 adds 40001). 32-bit values take two
registers, the high word first (big-endian word order); every value is unsigned.

Station-owned, read only (a write is refused with exception 02, illegal address):

    0  MapVersion          1
    1  Heartbeat           +1 every 100 ms (wraps at 65535): a PLC sees a stopped station
    2  Status              bit 0 Ready (a trigger is accepted now), bit 1 ResultsReady,
                           bit 2 Busy (a trigger is being decided), bit 3 SourceLive,
                           bit 4 Error (ErrorCode is not 0), bit 5 Switching (product change)
    3  SourceState         0 starting, 1 live, 2 reconnecting, 3 ended
    4  ErrorCode           0 none, 1 trigger while not Ready, 2 unknown product index,
                           3 product switch refused (its bundle failed), 4 source lost
    5  ActiveProduct       the product (configuration) index in use
    6  ResultOutcome       0 none yet, 1 OK, 2 NG
    7  ResultClass         the label's index in the model's labels; 65535 for unknown
    8  ResultConfidence    x1000 (0..1000)
    9  ResultAnomalyScore  the anomaly score / the threshold, x1000 (1000: at the threshold, above:
                           anomalous; saturates at 65534); 65535 when the model has none
    10 ResultReason        1 decided, 2 no_frame, 3 timeout, 4 stopped, 5 error
    11 ResultSequence      +1 with every result (wraps at 65535)
    12-13 ResultPartNumber the part number of the trigger this result answers (uint32)
    14 ResultProduct       the product index that decided it
    20-21 OkCount          results OK (uint32, as every counter)
    22-23 NgCount          results NG
    24-25 UnknownCount     results whose label was unknown (also counted NG)
    26-27 TriggerErrors    triggers refused because the station was not Ready
    28-29 Timeouts         results NG because no answer was ready in time (no_frame, timeout)
    30-31 DroppedFrames    camera frames replaced by a newer one before they were decided
    32-33 FramesDecided    every frame decided, triggered or not
    34 LastProcessing      trigger to result, in 0.1 ms (saturates at 65535)
    35 MaxProcessing       the longest so far, in 0.1 ms

PLC-owned, read and write:

    100 Trigger            write 1: decide the part in front of the camera now
    101 ResultsAck         write 1: the result was read
    102-103 PartNumber     written before Trigger; echoed in ResultPartNumber and the log
    104 ProductRequest     the product index the line wants (see --products)
    105 ErrorReset         write 1: ErrorCode back to 0

The handshake: while Ready, the PLC writes PartNumber (optional) and Trigger = 1. The
station clears Trigger and Ready, sets Busy, and decides through the trigger path (the
frames captured after the trigger, voted with --vote, a fail-safe NG after
--trigger-timeout). It writes the result registers, adds one to ResultSequence, clears
Busy and sets ResultsReady, and holds the result until the PLC writes ResultsAck = 1;
then ResultsReady is cleared and Ready set. A Trigger while not Ready (a result waiting
for its acknowledgement, or a trigger still being decided) is never queued and never
silently dropped: Trigger is cleared, TriggerErrors counts it and ErrorCode is 1 until
ErrorReset or the next accepted trigger.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
import time

from lineside.errors import LinesideError, require

from .outputs import Output
from .records import Event

log = logging.getLogger(__name__)

MAP_VERSION = 1
REGISTERS = 110
HEARTBEAT_SECONDS = 0.1

(MAP_VERSION_REG, HEARTBEAT, STATUS, SOURCE_STATE, ERROR_CODE, ACTIVE_PRODUCT, RESULT_OUTCOME, RESULT_CLASS,
 RESULT_CONFIDENCE, RESULT_ANOMALY, RESULT_REASON, RESULT_SEQUENCE, RESULT_PART, _PART_LOW, RESULT_PRODUCT) = range(15)
OK_COUNT, NG_COUNT, UNKNOWN_COUNT, TRIGGER_ERRORS, TIMEOUTS, DROPPED_FRAMES, FRAMES_DECIDED = range(20, 34, 2)
LAST_PROCESSING, MAX_PROCESSING = 34, 35
TRIGGER, RESULTS_ACK, PART_NUMBER, _PART_NUMBER_LOW, PRODUCT_REQUEST, ERROR_RESET = range(100, 106)
PLC_OWNED = range(100, 106)

READY, RESULTS_READY, BUSY, SOURCE_LIVE, ERROR, SWITCHING = (1 << b for b in range(6))
SOURCE_CODES = {"starting": 0, "live": 1, "reconnecting": 2, "ended": 3}
REASON_CODES = {"decided": 1, "no_frame": 2, "timeout": 3, "stopped": 4, "error": 5}
ERROR_TRIGGER_NOT_READY, ERROR_UNKNOWN_PRODUCT, ERROR_SWITCH_REFUSED, ERROR_SOURCE_LOST = 1, 2, 3, 4
NO_VALUE = 0xFFFF
BIT_FUNCTIONS = (1, 2, 5, 15)     # coils and discrete inputs: the map has none


def parse_modbus_address(text: str) -> tuple[str, int]:
    """'5020', ':5020', 'HOST:PORT' -> (host, port); loopback unless a host is given."""
    text = str(text).strip()
    host, _, port = text.rpartition(":") if ":" in text else ("", "", text)
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise LinesideError(f"--modbus {text}: expected [HOST:]PORT, e.g. 127.0.0.1:5020 (502 is Modbus' own port)")
    return host, int(port)


def parse_allow(text: str | None) -> tuple | None:
    """--modbus-allow '10.0.0.5,10.0.1.0/24' -> networks; None: every client may connect."""
    if not text:
        return None
    nets = []
    for part in str(text).split(","):
        try:
            nets.append(ipaddress.ip_network(part.strip(), strict=False))
        except ValueError:
            raise LinesideError(f"--modbus-allow: '{part.strip()}' is not an address or network") from None
    return tuple(nets)


def words32(value: int) -> list[int]:
    """An unsigned 32-bit value as two registers, high word first (saturating)."""
    value = max(0, min(int(value), 0xFFFFFFFF))
    return [value >> 16, value & 0xFFFF]


class RegisterMap:
    """The registers and the handshake's state, shared by the Modbus server's thread (the
    PLC's reads and writes), the loop (decisions) and the trigger watchdog (answers)."""

    def __init__(self, triggers=None, labels=(), product: int = 0, on_product=None):
        self.regs = [0] * REGISTERS
        self.lock = threading.Lock()
        self.triggers = triggers
        self.labels = list(labels)
        self.on_product = on_product      # (index) -> None: the PLC asked for another product
        self.waiting: str | None = None   # the part id of the trigger being decided
        self.t_trigger = 0.0
        self.part_number = 0
        self.max_processing = 0
        self.regs[MAP_VERSION_REG] = MAP_VERSION
        self.regs[STATUS] = READY
        self.regs[ACTIVE_PRODUCT] = self.regs[PRODUCT_REQUEST] = product
        self.regs[RESULT_ANOMALY] = NO_VALUE
        self.regs[RESULT_CLASS] = NO_VALUE

    # -- the PLC (the server's thread) ------------------------------------------------------

    def read(self, address: int, count: int) -> list[int]:
        with self.lock:
            return self.regs[address:address + count]

    def write(self, address: int, values: list[int]) -> bool:
        """A PLC's write; False (refused, nothing written) when it touches a register the
        PLC does not own."""
        if address < PLC_OWNED.start or address + len(values) > PLC_OWNED.stop:
            return False
        product = None
        with self.lock:
            for offset, value in enumerate(values):
                self.regs[address + offset] = int(value) & 0xFFFF
            if self.regs[ERROR_RESET]:
                self.regs[ERROR_RESET] = 0
                self._error(0)
            if self.regs[RESULTS_ACK]:
                self.regs[RESULTS_ACK] = 0
                if self.regs[STATUS] & RESULTS_READY:
                    self._status(clear=RESULTS_READY, set_=READY)
            if address <= PRODUCT_REQUEST < address + len(values):
                product = self.regs[PRODUCT_REQUEST]
            if self.regs[TRIGGER]:
                self.regs[TRIGGER] = 0
                self._trigger()
        if product is not None and self.on_product is not None:
            self.on_product(product)
        return True

    def _trigger(self):
        """Trigger = 1 under the lock: accepted when Ready, else a trigger error."""
        if not self.regs[STATUS] & READY or self.triggers is None:
            self._count(TRIGGER_ERRORS)
            self._error(ERROR_TRIGGER_NOT_READY)
            log.info("modbus: trigger refused, the station is not ready (a result waits for ResultsAck "
                     "or a part is being decided)")
            return
        self.part_number = (self.regs[PART_NUMBER] << 16) | self.regs[_PART_NUMBER_LOW]
        self._status(clear=READY, set_=BUSY)
        if self.regs[ERROR_CODE] == ERROR_TRIGGER_NOT_READY:
            self._error(0)
        self.t_trigger = time.perf_counter()
        # the request goes in under the lock, so that its answer cannot come before `waiting` is set
        self.waiting = self.triggers.request(str(self.part_number) if self.part_number else None)

    # -- the station ------------------------------------------------------------------------

    def answer(self, answer):
        """A trigger's answer (any thread): the result, if it is the Modbus trigger's."""
        with self.lock:
            if self.waiting is None or answer.part_id != self.waiting:
                return
            self.waiting = None
            ms10 = min(NO_VALUE, int((time.perf_counter() - self.t_trigger) * 10_000))
            self.max_processing = max(self.max_processing, ms10)
            label_index = self.labels.index(answer.label) if answer.label in self.labels else NO_VALUE
            r = self.regs
            r[RESULT_OUTCOME] = 1 if answer.verdict == "OK" else 2
            r[RESULT_CLASS] = label_index
            r[RESULT_CONFIDENCE] = max(0, min(1000, round(answer.confidence * 1000)))
            score = getattr(answer, "anomaly_score", None)
            r[RESULT_ANOMALY] = NO_VALUE if score is None else max(0, min(NO_VALUE - 1, round(score * 1000)))
            r[RESULT_REASON] = REASON_CODES.get(answer.reason, 5)
            r[RESULT_PART:RESULT_PART + 2] = words32(self.part_number)
            r[RESULT_PRODUCT] = r[ACTIVE_PRODUCT]
            r[RESULT_SEQUENCE] = (r[RESULT_SEQUENCE] + 1) & 0xFFFF
            r[LAST_PROCESSING], r[MAX_PROCESSING] = ms10, self.max_processing
            self._count(OK_COUNT if answer.verdict == "OK" else NG_COUNT)
            if answer.label == "unknown":
                self._count(UNKNOWN_COUNT)
            if answer.reason in ("no_frame", "timeout"):
                self._count(TIMEOUTS)
            self._status(clear=BUSY, set_=RESULTS_READY)      # last: the result is whole when it shows

    def source(self, state: str):
        with self.lock:
            self.regs[SOURCE_STATE] = SOURCE_CODES.get(state, 0)
            if state == "live":
                self._status(set_=SOURCE_LIVE)
            else:
                self._status(clear=SOURCE_LIVE)
            if state == "reconnecting":
                self._error(ERROR_SOURCE_LOST)

    def frames(self, decided: int, dropped: int):
        with self.lock:
            self.regs[FRAMES_DECIDED:FRAMES_DECIDED + 2] = words32(decided)
            self.regs[DROPPED_FRAMES:DROPPED_FRAMES + 2] = words32(dropped)

    def product(self, index: int, labels=None, switching: bool = False, error: int = 0):
        with self.lock:
            self.regs[ACTIVE_PRODUCT] = index
            if labels is not None:
                self.labels = list(labels)
            if switching:
                self._status(set_=SWITCHING)
            else:
                self._status(clear=SWITCHING)
            if error:
                self._error(error)

    def beat(self):
        with self.lock:
            self.regs[HEARTBEAT] = (self.regs[HEARTBEAT] + 1) & 0xFFFF

    def counter(self, reg: int) -> int:
        with self.lock:
            return (self.regs[reg] << 16) | self.regs[reg + 1]

    # -- under the lock ---------------------------------------------------------------------

    def _count(self, reg: int):
        value = ((self.regs[reg] << 16) | self.regs[reg + 1]) + 1
        self.regs[reg:reg + 2] = words32(value)

    def _status(self, clear: int = 0, set_: int = 0):
        self.regs[STATUS] = (self.regs[STATUS] & ~clear) | set_

    def _error(self, code: int):
        self.regs[ERROR_CODE] = code
        self._status(clear=ERROR, set_=ERROR if code else 0)


class ModbusOutput(Output):
    """Serves the RegisterMap over Modbus TCP in its own thread; the loop only sets
    registers, it never waits for the PLC."""

    def __init__(self, address: str, labels, triggers=None, allow: str | None = None, on_product=None,
                 product: int = 0):
        require("pymodbus", "modbus")
        self.host, self.port = parse_modbus_address(address)
        self.allow = parse_allow(allow)
        self.map = RegisterMap(triggers, labels, product, on_product)
        self.refused_clients = 0
        self.refused_writes = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lineside-modbus", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        except Exception as exc:  # noqa: BLE001 - port in use, bad address
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise LinesideError(f"--modbus {self.host}:{self.port}: the server could not start ({exc})") from None
        log.info("Modbus TCP server on %s:%d (register map version %d)", self.host, self.port, MAP_VERSION)

    async def _start(self):
        from pymodbus.constants import ExcCodes
        from pymodbus.server import ModbusTcpServer
        from pymodbus.server.requesthandler import ServerRequestHandler
        from pymodbus.simulator import DataType, SimData, SimDevice

        owner = self

        async def action(func_code, start_address, address, count, registers, values):
            """Every request: reads see the map, writes go to it; only PLC-owned registers
            may be written, and only with functions 6 and 16."""
            offset = address - start_address
            if func_code in BIT_FUNCTIONS:
                return ExcCodes.ILLEGAL_FUNCTION
            if values is None:      # a read, or a write's answer echoing what is there now
                registers[offset:offset + count] = owner.map.read(address, count)
                return None
            if not owner.map.write(address, list(values)):
                owner.refused_writes += 1
                return ExcCodes.ILLEGAL_ADDRESS
            return None

        class Handler(ServerRequestHandler):
            def connection_made(self, transport):
                peer = transport.get_extra_info("peername") or ("",)
                if owner.allow is not None and not owner.allowed(peer[0]):
                    owner.refused_clients += 1
                    log.warning("modbus: connection from %s refused (not in --modbus-allow)", peer[0])
                    transport.abort()
                    return
                super().connection_made(transport)

        class Server(ModbusTcpServer):
            def callback_new_connection(self):
                return Handler(self, self.trace_packet, self.trace_pdu, self.trace_connect)

        device = SimDevice(0, simdata=[SimData(0, count=REGISTERS, datatype=DataType.REGISTERS)], action=action)
        logging.getLogger("pymodbus").setLevel(logging.ERROR)
        self.server = Server(device, address=(self.host, self.port))
        await self.server.serve_forever(background=True)
        self._beat = asyncio.ensure_future(self._heartbeat())

    async def _heartbeat(self):
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            self.map.beat()

    def allowed(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in net for net in self.allow)

    # -- called by the loop and the trigger path (never blocking) ---------------------------

    def observe(self, frame, decision, stats):
        if self.map.regs[SOURCE_STATE] == SOURCE_CODES["starting"]:
            self.map.source("live")
        self.map.frames(stats.frames, stats.dropped())

    def event(self, event: Event):
        if self.state.source_state != "starting":
            self.map.source(self.state.source_state)

    def answer(self, answer):
        self.map.answer(answer)

    def product_changed(self, product, refused: bool):
        """The product switch's listener: the active index and labels, or a refusal."""
        self.map.product(product.index, labels=product.model.labels, error=ERROR_UNKNOWN_PRODUCT if refused else 0)

    def counters(self) -> dict:
        return {"modbus_trigger_errors": self.map.counter(TRIGGER_ERRORS),
                "modbus_refused_writes": self.refused_writes, "modbus_refused_clients": self.refused_clients}

    def close(self, summary: dict | None = None):
        self.map.source("ended")

        async def stop():
            self._beat.cancel()
            await self.server.shutdown()

        try:
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)
        except Exception as exc:  # noqa: BLE001
            log.warning("Modbus server did not stop cleanly: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


if __name__ == "__main__":     # python -m lineside.runtime.modbus: the register map
    print(__doc__)
