"""Every decision goes on record: a SQLite log (WAL) or JSON lines, and the frames worth a look.

Writes happen on a writer thread in batches, so the camera loop never waits for
the disk. `close()` writes everything handed over before it returns: a decision
the loop has recorded is never lost on a clean stop (SIGINT/SIGTERM).
"""

from __future__ import annotations

import json
import logging
import queue
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from lineside.errors import LinesideError

log = logging.getLogger(__name__)

SAVE_WHEN = ("ng", "unknown", "all", "flagged")
BATCH_SECONDS = 0.2
BATCH_ROWS = 500

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY, started REAL, source TEXT, model TEXT, model_sha256 TEXT, labels TEXT,
    settings TEXT, ended REAL, summary TEXT);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY, run INTEGER, ts REAL, frame INTEGER, source TEXT, origin TEXT,
    label TEXT, confidence REAL, top TEXT, verdict TEXT, decision TEXT, probabilities TEXT,
    flags TEXT, latency_ms REAL, capture_to_decision_ms REAL, model_sha256 TEXT);
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, run INTEGER, ts REAL, kind TEXT, detail TEXT);
"""
DECISION_COLUMNS = ("run", "ts", "frame", "source", "origin", "label", "confidence", "top", "verdict", "decision",
                    "probabilities", "flags", "latency_ms", "capture_to_decision_ms", "model_sha256")


@dataclass
class SavePolicy:
    folder: Path
    when: tuple[str, ...] = ("ng", "unknown")
    max_files: int = 1000
    max_mb: float = 500.0

    def __post_init__(self):
        bad = [w for w in self.when if w not in SAVE_WHEN]
        if bad:
            raise LinesideError(f"--save-when: {', '.join(bad)} is not one of {', '.join(SAVE_WHEN)}")
        if self.max_files < 1 or self.max_mb <= 0:
            raise LinesideError("--save-max-files and --save-max-mb must be positive")

    def wants(self, row: dict) -> bool:
        return ("all" in self.when or ("ng" in self.when and row.get("verdict") == "NG")
                or ("unknown" in self.when and row.get("label") == "unknown")
                or ("flagged" in self.when and bool(row.get("flags"))))


# The name of every frame lineside saves: housekeeping deletes files of this name only, so
# an operator's own images in the folder are never touched.
SAVED_PREFIX = "lineside_"
SAVED_NAME = re.compile(r"^lineside_\d{8}-\d{6}_\d{9}_[^/\\]*\.jpg$")


class FrameSaver:
    """JPEG files of chosen frames; the oldest of them are deleted to stay under the caps.
    Only files named as lineside names its frames (SAVED_NAME) count and are deleted."""

    def __init__(self, policy: SavePolicy):
        self.policy = policy
        policy.folder.mkdir(parents=True, exist_ok=True)
        existing = sorted((p for p in policy.folder.glob(f"{SAVED_PREFIX}*.jpg") if SAVED_NAME.match(p.name)),
                          key=lambda p: p.stat().st_mtime)
        self.files = [(p, p.stat().st_size) for p in existing]
        self.bytes = sum(s for _, s in self.files)
        self.saved = 0
        self.failed = 0

    def save(self, row: dict, image: np.ndarray):
        label = re.sub(r"[^\w.-]", "-", str(row["label"]))
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(row["ts"]))
        path = self.policy.folder / f"{SAVED_PREFIX}{stamp}_{row['frame']:09d}_{label}.jpg"
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            raise OSError("the frame could not be encoded as JPEG")
        try:
            path.write_bytes(data.tobytes())
        except OSError:
            path.unlink(missing_ok=True)   # no half-written frame left behind
            raise
        self.files.append((path, len(data)))
        self.bytes += len(data)
        self.saved += 1
        while self.files and (len(self.files) > self.policy.max_files or self.bytes > self.policy.max_mb * 2**20):
            old, size = self.files.pop(0)
            old.unlink(missing_ok=True)
            self.bytes -= size


LOG_KINDS = {".jsonl": "jsonl", ".sqlite": "sqlite", ".sqlite3": "sqlite", ".db": "sqlite"}


def log_kind(path: Path) -> str:
    """The log format a --log path asks for, by its extension (any case)."""
    kind = LOG_KINDS.get(path.suffix.lower())
    if kind is None:
        raise LinesideError(f"--log {path}: unknown log format '{path.suffix}' (use {', '.join(LOG_KINDS)})")
    return kind


class Recorder:
    """Writer thread for decisions and events: JSON lines for a .jsonl `log_path`, a
    SQLite database for .sqlite, .sqlite3 or .db (see log_kind)."""

    def __init__(self, log_path: Path | None, run_info: dict, save: SavePolicy | None = None):
        self.path = Path(log_path) if log_path else None
        self.kind = None if self.path is None else log_kind(self.path)
        self.saver = FrameSaver(save) if save else None
        self._queue: queue.Queue = queue.Queue()
        self.written = 0
        self.error: BaseException | None = None
        self.run_id = None
        self._open(run_info)
        self._thread = threading.Thread(target=self._loop, name="lineside-recorder", daemon=True)
        self._thread.start()

    # -- called by the camera loop ---------------------------------------------------------

    def decision(self, row: dict, image: np.ndarray | None = None):
        if self.error:
            raise LinesideError(f"{self.path}: the log cannot be written ({self.error})")
        keep = image if self.saver is not None and self.saver.policy.wants(row) else None
        self._queue.put(("decision", row, keep))

    def event(self, kind: str, detail: str = ""):
        log.warning("%s: %s", kind, detail)
        self._queue.put(("event", {"ts": time.time(), "kind": kind, "detail": detail}, None))

    def close(self, summary: dict | None = None):
        """Write everything queued, then the run summary, and close the file."""
        self._queue.put(("close", summary or {}, None))
        self._thread.join()
        if self.error:
            raise LinesideError(f"{self.path}: the log could not be written ({self.error})")

    # -- the writer thread -----------------------------------------------------------------

    def _open(self, run_info: dict):
        if self.kind == "sqlite":
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.db = sqlite3.connect(str(self.path), check_same_thread=False)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
                self.db.executescript(SCHEMA)
                cur = self.db.execute(
                    "INSERT INTO runs (started, source, model, model_sha256, labels, settings) VALUES (?,?,?,?,?,?)",
                    (time.time(), run_info.get("source"), run_info.get("model"), run_info.get("model_sha256"),
                     json.dumps(run_info.get("labels")), json.dumps(run_info.get("settings"))))
                self.db.commit()
            except sqlite3.DatabaseError as exc:
                raise LinesideError(f"--log {self.path}: not a usable SQLite database ({exc})") from exc
            self.run_id = cur.lastrowid
        elif self.kind == "jsonl":
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a", encoding="utf-8")
            self.file.write(json.dumps({"type": "run", "ts": time.time(), **run_info}) + "\n")
            self.file.flush()

    def _loop(self):
        closing = None
        while closing is None:
            batch = [self._queue.get()]
            deadline = time.monotonic() + BATCH_SECONDS
            while len(batch) < BATCH_ROWS and batch[-1][0] != "close":
                try:
                    batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            if batch[-1][0] == "close":
                closing = batch.pop()[1]
            try:
                self._write(batch)
            except Exception as exc:  # noqa: BLE001 - surfaced to the loop on its next record()
                self.error = exc
                log.error("log write failed: %s", exc)
        try:
            self._finish(closing)
        except Exception as exc:  # noqa: BLE001
            self.error = exc

    def _write(self, batch):
        """The decisions and events of a batch go on record first; the frames worth a look
        are saved after, each on its own: a frame that cannot be saved (a full disk) is a
        `save_failed` event and a count, never a lost decision or a stopped line."""
        self._log(batch)
        if not self.saver:
            return
        failures = []
        for kind, row, image in batch:
            if image is None:
                continue
            try:
                self.saver.save(row, image)
            except OSError as exc:
                self.saver.failed += 1
                failures.append(("event", {"ts": time.time(), "kind": "save_failed",
                                           "detail": f"frame {row.get('frame')}: {self.saver.policy.folder}: {exc}"},
                                 None))
        if failures:
            log.warning("save_failed: %d frame(s) not saved (%s)", len(failures), failures[-1][1]["detail"])
            self._log(failures)

    def _log(self, batch):
        decisions = [row for kind, row, _ in batch if kind == "decision"]
        events = [row for kind, row, _ in batch if kind == "event"]
        if self.kind == "sqlite":
            self.db.executemany(
                f"INSERT INTO decisions ({','.join(DECISION_COLUMNS)}) VALUES ({','.join('?' * len(DECISION_COLUMNS))})",
                [tuple(_sql(r.get(c), self.run_id if c == "run" else None) for c in DECISION_COLUMNS)
                 for r in decisions])
            self.db.executemany("INSERT INTO events (run, ts, kind, detail) VALUES (?,?,?,?)",
                                [(self.run_id, e["ts"], e["kind"], e["detail"]) for e in events])
            self.db.commit()
        elif self.kind == "jsonl":
            for kind, row, _ in batch:
                self.file.write(json.dumps({"type": kind, **row}) + "\n")
            self.file.flush()
        self.written += len(decisions)

    def _finish(self, summary: dict):
        if self.kind == "sqlite":
            self.db.execute("UPDATE runs SET ended=?, summary=? WHERE id=?",
                            (time.time(), json.dumps(summary), self.run_id))
            self.db.commit()
            self.db.close()
        elif self.kind == "jsonl":
            self.file.write(json.dumps({"type": "end", "ts": time.time(), "summary": summary}) + "\n")
            self.file.close()


def _sql(value, default):
    if value is None:
        return default
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return value
