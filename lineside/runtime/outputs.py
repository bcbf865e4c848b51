"""The station's outputs beside the decision log (MQTT, OPC UA, Modbus TCP, the status
page, and whatever comes next): one interface, and one shared state they all report.

The Recorder hands every decision and event to each output from the camera loop's
thread, after updating the StationState; the loop calls `observe` once per decision;
answers to triggered parts, product switches and the drift monitor and shadow model
reach every output the same way. Every method is a no-op here: an output overrides what
it needs, and none may block (they queue, or set values another thread serves). One
failing output is counted and logged, never raised into the loop (Recorder._to_output).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:      # type names only: records imports this module
    from .records import DecisionRow, Event

# what the outputs make of events, in one place
SOURCE_STATES = {"source_lost": "reconnecting", "source_unavailable": "reconnecting", "source_back": "live",
                 "source_timeout": "ended"}
# Events that report no fault: they never become the station's last error (OPC UA's
# LastError, MQTT's status, the page), which an operator reads as what went wrong.
NOT_ERRORS = ("source_back", "roi_fits", "frame_size", "part_answer", "disk_ok", "product_switch", "update_loaded",
              "update_requested", "update_skipped", "drift_cleared", "promoted", "rolled_back", "log_pruned")
OUTCOMES = ("OK", "NG", "unknown")


def outcome(row: DecisionRow) -> str | None:
    """The count a decision goes to: unknown, OK or NG (None without --ok-classes)."""
    if row.label == "unknown":
        return "unknown"
    return row.verdict if row.verdict in ("OK", "NG") else None


class StationState:
    """What every output says of the station, kept once: the source's state (starting,
    live, reconnecting, ended) and since when, the last error, the decisions and their
    OK / NG / unknown counts. Updated by the Recorder in the loop's thread (and `error`
    by an output's own thread, a connection lost say); outputs read it."""

    def __init__(self):
        self.source_state = "starting"
        self.since = time.time()
        self.last_error: str | None = None
        self.decisions = 0
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self._lock = threading.Lock()

    def _set(self, state: str) -> bool:
        if state == self.source_state:
            return False
        self.source_state, self.since = state, time.time()
        return True

    def on_decision(self, row: DecisionRow) -> None:
        self.decisions += 1
        counted = outcome(row)
        if counted:
            self.counts[counted] += 1
        if self.source_state == "starting":
            self._set("live")

    def on_event(self, event: Event) -> bool:
        """Take an event in; whether the source's state changed with it."""
        if event.kind not in NOT_ERRORS:
            self.error(f"{event.kind}: {event.detail}")
        state = SOURCE_STATES.get(event.kind)
        return self._set(state) if state else False

    def error(self, text: str) -> None:
        with self._lock:
            self.last_error = text

    def end(self) -> None:
        self._set("ended")


class Output:
    """One output of the station. `state` is the shared StationState (given by `attach`
    before the first decision)."""

    _state: StationState | None = None

    @property
    def state(self) -> StationState:
        if self._state is None:
            self._state = StationState()      # an output used on its own (a test): a state of its own
        return self._state

    def attach(self, state: StationState) -> None:
        self._state = state

    def observe(self, frame, decision, stats) -> None:
        """Once per decision, from the loop: the frame, the Decision and the loop's counters."""

    def decision(self, row: DecisionRow) -> None:
        """A decision as the log records it (after state.on_decision)."""

    def event(self, event: Event) -> None:
        """An event as the log records it (after state.on_event)."""

    def answer(self, answer) -> None:
        """A triggered part's answer (runtime/trigger.py)."""

    def product_changed(self, product, refused: bool) -> None:
        """The active product after a switch request, or a refused request (runtime/products.py)."""

    def watch(self, drift=None, shadow=None) -> None:
        """The run's DriftMonitor and ShadowRunner, when it has them, for outputs that show them."""

    def counters(self) -> dict:
        """This output's counts for the run's summary."""
        return {}

    def close(self, summary: dict | None = None) -> None:
        """The run ended (summary: its counts, or None when it failed to start)."""
