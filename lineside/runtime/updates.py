"""Updates without stopping the line: `lineside run BUNDLE --updates DIR`.

The station watches DIR for bundle folders (a folder holding bundle.json, copied there
whole: a folder whose files changed in the last UPDATE_SETTLE_SECONDS is left until
they settle). A new one (its bundle.json unlike any seen before) is opened in this
watcher's thread while the line runs: checked as at the start (its signature with
--trust, every file against bundle.json), given the active product's ROI, OK classes,
threshold and vote, and compiled. Then it takes over between two frames through the
same switch as a product changeover (runtime/products.py): no decision is lost, and
every decision names the model that made it (`model_sha256`). The old model stays
loaded until the new one has decided RELEASE_AFTER frames, then is released (an update
that comes before that releases the models replaced earlier at once: only the one just
replaced waits). A bundle
that fails any check is refused with an `update_refused` event naming why, and the
old one stays; it is tried again only when its bundle.json changes. Several new in one
scan: the last in name order is taken (or the one before it, if it is refused), the
others are `update_skipped` events.

A bundle can also be asked for by name (`request`: the MQTT topic PREFIX/update, the
OPC UA method UpdateModel): a folder directly in DIR, taken at the watcher's next scan
even when it ran before (going back to the previous model is asking for its folder).
Nothing outside DIR can be named, and it passes the same checks.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path

from lineside.bundles import is_bundle, manifest_digest
from lineside.errors import LinesideError
from lineside.text import printable

log = logging.getLogger(__name__)

UPDATE_SETTLE_SECONDS = 2.0
SCAN_SECONDS = 0.5
RELEASE_AFTER = 30          # frames the new model decides before the old one is released


class UpdateWatcher(threading.Thread):
    """Scans `folder`; `load(path)` -> a Product (its engine not made yet), or LinesideError."""

    def __init__(self, folder, switch, load, on_event, stop: threading.Event, settle: float | None = None):
        super().__init__(name="lineside-updates", daemon=True)
        self.folder = Path(folder)
        self.switch, self.load, self.on_event, self.stop = switch, load, on_event, stop
        self.settle = UPDATE_SETTLE_SECONDS if settle is None else settle
        self.seen: set[str] = set()
        self.loaded = 0
        self.refused = 0
        self.released = 0
        self.requested: queue.Queue = queue.Queue()     # bundle folders asked for by name (request)
        active_dir = Path(switch.active.model.path).parent
        key = manifest_digest(active_dir)
        if key:
            self.seen.add(key)          # the bundle running now is no update

    def request(self, name) -> str | None:
        """A bundle folder of the watched folder asked for by its name (MQTT, OPC UA): queued
        for the next scan and its name returned, or None (an `update_refused` event says why)
        when the name is not a bundle folder directly in the watched folder."""
        name = str(name if name is not None else "").strip()[:200]
        candidate = self.folder / name
        inside = bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name
        try:
            inside = inside and candidate.resolve().parent == self.folder.resolve() and is_bundle(candidate)
        except OSError:
            inside = False
        if not inside:
            self.refused += 1
            self.on_event("update_refused", f"requested update {printable(name)!r}: not a bundle folder in "
                                            f"{printable(self.folder)}; {self.switch.active.name} keeps running its model")
            return None
        self.on_event("update_requested", f"{printable(name)}: loaded and checked at the next scan")
        self.requested.put(candidate)
        return name

    def run(self):
        while not self.stop.wait(SCAN_SECONDS):     # read each time: tests shorten it
            try:
                self.released += self.switch.release_retired(RELEASE_AFTER)
                while not self.requested.empty():
                    candidate = self.requested.get_nowait()
                    key = manifest_digest(candidate)
                    if key:
                        self.seen.add(key)      # asked for: the scan need not take it again
                    self.take(candidate)
                self.scan()
            except Exception as exc:  # noqa: BLE001 - the watcher never stops the line
                log.error("updates: %s", exc)

    def scan(self):
        try:
            candidates = sorted(p for p in self.folder.iterdir() if p.is_dir() and is_bundle(p))
        except OSError:
            return
        now = time.time()
        ready = []
        for candidate in candidates:
            key = manifest_digest(candidate)
            if key is None or key in self.seen:
                continue
            try:
                newest = max(f.stat().st_mtime for f in candidate.iterdir())
            except (OSError, ValueError):
                continue
            if now - newest < self.settle:
                continue                    # still being copied
            self.seen.add(key)
            ready.append(candidate)
        # Several new at once: the last in name order takes over, as if each had been taken
        # in turn, without loading the others for nothing; a refused one gives way to the one before.
        for i in range(len(ready) - 1, -1, -1):
            if self.take(ready[i]):
                for skipped in ready[:i]:
                    self.on_event("update_skipped", f"{printable(skipped)}: {printable(ready[i].name)} came in the "
                                                    "same scan and takes over instead (ask for it by name to run it)")
                break

    def take(self, candidate: Path) -> bool:
        t0 = time.perf_counter()
        try:
            product = self.load(candidate)
            product.engine = product.model.engine(self.switch.hint)
        except LinesideError as exc:
            self.refused += 1
            self.on_event("update_refused", f"{printable(candidate)}: {exc}; {self.switch.active.name} keeps "
                                            "running its model")
            return False
        self.loaded += 1
        self.on_event("update_loaded", f"{printable(candidate)} (model {product.model.checksum[:12]}) loaded and "
                                       f"checked in {time.perf_counter() - t0:.1f} s; it takes over at the next frame")
        self.switch.replace(product)
        return True
