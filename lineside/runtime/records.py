"""Every decision goes on record: a SQLite log (WAL) or JSON lines, and the frames worth a look.

Writes happen on a writer thread in batches, so the camera loop never waits for
the disk. The log comes first and nothing else can touch it:

- a frame that cannot be saved (full disk, removed folder) is a `save_failed`
  event and a count; the decision is logged all the same;
- when the log itself cannot be written (full disk, another program holding
  its lock, a removed directory) the decisions wait in a bounded buffer and the
  write is retried; once it succeeds a `log_unwritable` event says for how long
  and why, and how many decisions did not fit in the buffer (counted as
  `not_logged`);
- a log file deleted or replaced during the run is noticed, a new one is
  started and a `log_recreated` event says so.

`close()` writes everything handed over before it returns (retrying for a while
if the log is unwritable): a decision the loop has made is either in the log or
counted in `not_logged`.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import cv2
import numpy as np

from lineside.errors import LinesideError
from lineside.text import printable

from .outputs import NOT_ERRORS, Output, StationState

log = logging.getLogger(__name__)

SAVE_WHEN = ("ng", "unknown", "all", "flagged", "worth")
NEAR_MARGIN = 0.2          # top-1 minus top-2 probability below this: the model hesitates between two classes
NEAR_REJECT = 0.1          # confidence within this above --reject-below: nearly unknown
RANDOM_SHARE = 0.02        # of the confident frames, kept at random so that a training set is not all hard cases
RANDOM_QUOTA = 0.25        # the random ones take at most this share of the hour's quota
BATCH_SECONDS = 0.2
BATCH_ROWS = 500
LOG_BUFFER_ROWS = 50_000     # decisions kept while the log is unwritable (about half an hour at 30 FPS)
LOG_BUFFER_EVENTS = 5_000
RETRY_SECONDS = 0.5          # between attempts to write an unwritable log
LOCK_WAIT_SECONDS = 1.0      # how long one SQLite write waits for another program's lock
CLOSE_RETRY_SECONDS = 10.0   # how long close() keeps trying an unwritable log
MAX_QUEUED_IMAGES = 64       # frames waiting to be saved; beyond this a frame is not saved (save_failed)
DISK_CHECK_SECONDS = 60.0    # how often the free space where the log is gets looked at
DISK_LOW_MB = 1024           # below this free: a disk_low event (once; disk_ok above twice this)
DISK_LOW_ENV = "LINESIDE_DISK_LOW_MB"   # sets another; 0 turns the check off
PRUNE_SECONDS = 600.0        # with --log-keep-days: how often the log's old rows are deleted
PRUNE_BATCH = 5_000          # rows deleted per transaction, oldest first


@dataclass(slots=True)
class DecisionRow:
    """One decision, as the loop makes it and every log writes it."""
    ts: float
    frame: int
    source: str
    origin: str
    label: str
    confidence: float
    top: str
    verdict: str | None
    decision: str | None
    probabilities: dict
    flags: list
    latency_ms: float
    capture_to_decision_ms: float
    model_sha256: str
    part_id: str | None = None     # the part a trigger asked about, when this frame answers it
    saved: str | None = None       # the file name of the frame in the --save folder, when it was saved
    product: str | None = None     # the product (--products) whose model and settings decided it
    capture: str | None = None     # why --save-when worth kept it: unknown, near_threshold, disagreement, random
    anomaly_score: float | None = None   # an anomaly model's score / its threshold (above 1: anomalous)

    def __post_init__(self):
        # Every output writes these as UTF-8: a file name that is not UTF-8 (or any text from
        # outside) is made printable here, once, so that no output can fail on it.
        for name in TEXT_FIELDS:
            value = getattr(self, name)
            if value is not None and not (type(value) is str and value.isascii()):
                setattr(self, name, printable(value))
        if not all(type(k) is str and k.isascii() for k in self.probabilities):
            self.probabilities = {printable(k): v for k, v in self.probabilities.items()}
        if not all(type(f) is str and f.isascii() for f in self.flags):
            self.flags = [printable(f) for f in self.flags]

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in ROW_FIELDS}


TEXT_FIELDS = ("source", "origin", "label", "top", "verdict", "decision", "model_sha256", "part_id", "saved",
               "product", "capture")
ROW_FIELDS = tuple(f.name for f in fields(DecisionRow))
DECISION_COLUMNS = ("run", *ROW_FIELDS)


@dataclass(slots=True)
class Event:
    ts: float
    kind: str
    detail: str

    def __post_init__(self):
        self.kind, self.detail = printable(self.kind), printable(self.detail)


SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY, started REAL, source TEXT, model TEXT, model_sha256 TEXT, labels TEXT,
    settings TEXT, ended REAL, summary TEXT);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY, run INTEGER, ts REAL, frame INTEGER, source TEXT, origin TEXT,
    label TEXT, confidence REAL, top TEXT, verdict TEXT, decision TEXT, probabilities TEXT,
    flags TEXT, latency_ms REAL, capture_to_decision_ms REAL, model_sha256 TEXT, part_id TEXT, saved TEXT,
    product TEXT, capture TEXT, anomaly_score REAL);
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, run INTEGER, ts REAL, kind TEXT, detail TEXT);
CREATE TABLE IF NOT EXISTS shadow (
    id INTEGER PRIMARY KEY, run INTEGER, ts REAL, frame INTEGER, label TEXT, confidence REAL, verdict TEXT,
    model_sha256 TEXT, active_label TEXT, active_verdict TEXT, agrees INTEGER);
"""


def check_save_options(when, max_files: int, max_mb: float, per_hour: int) -> None:
    """--save-when, the --save caps and --capture-per-hour, or a one-line error naming the option."""
    bad = [w for w in when if w not in SAVE_WHEN]
    if bad:
        raise LinesideError(f"--save-when: {', '.join(bad)} is not one of {', '.join(SAVE_WHEN)}")
    if max_files < 1 or max_mb <= 0:
        raise LinesideError("--save-max-files and --save-max-mb must be positive")
    if per_hour < 1:
        raise LinesideError("--capture-per-hour: must be positive")


@dataclass
class SavePolicy:
    """Which frames go to --save. `worth` keeps the frames worth labelling next, at most
    per_hour of them in any hour: unknowns, the frames near the decision (two classes
    within NEAR_MARGIN, or a confidence within NEAR_REJECT above --reject-below), the
    frames a shadow model disagrees on (see the recorder's shadow()), and RANDOM_SHARE of
    the confident rest (at most RANDOM_QUOTA of the hour's quota), so that the next
    training set is not all hard cases. The reason is the decision's `capture`."""
    folder: Path
    when: tuple[str, ...] = ("ng", "unknown")
    max_files: int = 1000
    max_mb: float = 500.0
    per_hour: int = 120
    reject_below: float | None = None
    seed: int = 0
    # an anomaly model's frame -> heatmap overlay (BGR), saved beside each NG frame it saves
    heatmap: object = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        check_save_options(self.when, self.max_files, self.max_mb, self.per_hour)
        self._kept: deque = deque()         # (time, random?) of the frames `worth` kept in the last hour
        self._rng = np.random.default_rng(self.seed)
        self._lock = threading.Lock()        # the loop and the shadow's thread both ask

    def wants(self, row: DecisionRow) -> bool:
        if "worth" in self.when and self.worth(row):
            return True
        return ("all" in self.when or ("ng" in self.when and row.verdict == "NG")
                or ("unknown" in self.when and row.label == "unknown")
                or ("flagged" in self.when and bool(row.flags)))

    def worth(self, row: DecisionRow, reason: str | None = None) -> bool:
        """Whether to keep the frame for labelling (and row.capture says why), within the quota."""
        with self._lock:
            return self._worth(row, reason)

    def _worth(self, row: DecisionRow, reason: str | None) -> bool:
        reason = reason or self._reason(row)
        if reason is None:
            return False
        now = row.ts
        while self._kept and self._kept[-1][0] > now + 60:
            self._kept.pop()            # the clock was set back (NTP): what it kept "later" would block the quota
        while self._kept and self._kept[0][0] <= now - 3600:
            self._kept.popleft()
        if len(self._kept) >= self.per_hour:
            return False
        if reason == "random" and sum(r for _, r in self._kept) >= max(1, int(self.per_hour * RANDOM_QUOTA)):
            return False
        self._kept.append((now, reason == "random"))
        row.capture = reason
        return True

    def _reason(self, row: DecisionRow) -> str | None:
        if row.label == "unknown":
            return "unknown"
        top = sorted(row.probabilities.values(), reverse=True)[:2] if row.probabilities else []
        if len(top) == 2 and top[0] - top[1] < NEAR_MARGIN:
            return "near_threshold"
        if self.reject_below is not None and row.confidence < self.reject_below + NEAR_REJECT:
            return "near_threshold"
        return "random" if self._rng.random() < RANDOM_SHARE else None


# The name of every frame lineside saves: housekeeping deletes files of this name only, so
# an operator's own images in the folder are never touched.
SAVED_PREFIX = "lineside_"
SAVED_NAME = re.compile(r"^lineside_\d{8}-\d{6}_\d{9}_[^/\\]*\.jpg$")


class FrameSaver:
    """JPEG files of chosen frames; the oldest of them are deleted to stay under the caps.
    Only files named as lineside names its frames (SAVED_NAME) count and are deleted."""

    def __init__(self, policy: SavePolicy):
        self.policy = policy
        folder = policy.folder
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LinesideError(f"--save {folder}: cannot create this folder ({_reason(exc)})") from exc
        if not os.access(folder, os.W_OK | os.X_OK):
            raise LinesideError(f"--save {folder}: this folder is not writable")
        existing = sorted((p for p in folder.glob(f"{SAVED_PREFIX}*.jpg") if SAVED_NAME.match(p.name)),
                          key=lambda p: p.stat().st_mtime)
        self.files = [(p, p.stat().st_size) for p in existing]
        self.bytes = sum(s for _, s in self.files)
        self.saved = 0
        self.failed = 0

    @staticmethod
    def name(row: DecisionRow) -> str:
        """The file name a frame is saved under (matches SAVED_NAME)."""
        label = re.sub(r"[^\w.-]", "-", str(row.label))
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(row.ts))
        return f"{SAVED_PREFIX}{stamp}_{row.frame:09d}_{label}.jpg"

    def save(self, row: DecisionRow, image: np.ndarray):
        path = self.policy.folder / (row.saved or self.name(row))
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
        if self.policy.heatmap is not None and row.verdict == "NG" and row.label != "unknown":
            self._save_heatmap(path, image)
        while self.files and (len(self.files) > self.policy.max_files or self.bytes > self.policy.max_mb * 2**20):
            old, size = self.files.pop(0)
            old.unlink(missing_ok=True)
            self.bytes -= size


    def save_batch(self, images, events: deque) -> None:
        """The writer's batch of frames to keep (row, image), saved before their rows are
        written: a frame that could not be saved is not named in the log (its row's
        `saved` cleared, a save_failed event added to `events`)."""
        failures = 0
        for row, image in images:
            try:
                self.save(row, image)
            except OSError as exc:
                row.saved = None
                failures += 1
                self._failed(row, exc, events)
        if failures:
            log.warning("save_failed: %d frame(s) not saved (%s)", failures, events[-1].detail)

    def _failed(self, row: DecisionRow, exc: OSError, events: deque) -> None:
        self.failed += 1
        events.append(Event(time.time(), "save_failed", f"frame {row.frame}: {self.policy.folder}: {_reason(exc)}"))

    def keep_after(self, keeps, log_file, events: deque) -> None:
        """Frames kept after their decision was written (runtime/shadow.py): saved, then
        their row in `log_file` annotated with the file's name."""
        for row, image in keeps:
            try:
                self.save(row, image)
            except OSError as exc:
                self._failed(row, exc, events)
                continue
            if log_file is not None:
                try:
                    log_file.annotate(row)
                except (OSError, sqlite3.Error) as exc:
                    log.error("%s: frame %d kept as %s, but its row could not name it (%s)", log_file.path,
                              row.frame, row.saved, _reason(exc))

    def _save_heatmap(self, frame_path: Path, image: np.ndarray):
        """NAME.heatmap.jpg beside the frame NAME.jpg (a name housekeeping counts and
        deletes like the frames'). Whatever goes wrong costs the overlay only, never the
        frame or the writer thread: it is counted as a failed save and logged."""
        path = frame_path.with_name(frame_path.stem + ".heatmap.jpg")
        try:
            ok, data = cv2.imencode(".jpg", self.policy.heatmap(image), [cv2.IMWRITE_JPEG_QUALITY, 90])
            if not ok:
                raise OSError("the overlay could not be encoded as JPEG")
            path.write_bytes(data.tobytes())
        except Exception as exc:  # noqa: BLE001 - a heatmap is a courtesy, the frame is saved
            path.unlink(missing_ok=True)
            self.failed += 1
            log.warning("%s: heatmap not saved (%s)", path, _reason(exc) if isinstance(exc, OSError) else exc)
            return
        self.files.append((path, len(data)))
        self.bytes += len(data)


# --- the log writers: one interface, one class per format -------------------------------

LOG_KINDS = {".jsonl": "jsonl", ".sqlite": "sqlite", ".sqlite3": "sqlite", ".db": "sqlite"}


def open_sqlite_log(path, command: str) -> sqlite3.Connection:
    """A SQLite decision log opened read-only for `command` (compare, score), with one-line
    errors for a missing file or a log of another kind."""
    path = Path(path)
    if not path.is_file():
        raise LinesideError(f"{path}: no such log")
    if log_kind(path) != "sqlite":
        raise LinesideError(f"{path}: {command} reads a SQLite log (--log FILE.sqlite)")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def log_kind(path: Path) -> str:
    """The log format a --log path asks for, by its extension (any case)."""
    kind = LOG_KINDS.get(path.suffix.lower())
    if kind is None:
        raise LinesideError(f"--log {path}: unknown log format '{path.suffix}' (use {', '.join(LOG_KINDS)})")
    return kind


class LogFile:
    """One log file. `write()` puts a batch on record whole or raises with nothing of it
    written (OSError or sqlite3.Error), so a failed batch can simply be tried again."""

    def __init__(self, path: Path, run_info: dict):
        self.path = path
        self.run_info = run_info
        self._identity = None

    def open(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open()
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)

    def replaced(self) -> bool:
        """The file at the path is no longer the one open (deleted, or another put there)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != self._identity

    def _open(self):
        raise NotImplementedError

    def write(self, decisions: list[DecisionRow], events: list[Event], shadows=()):
        raise NotImplementedError

    def finish(self, summary: dict):
        raise NotImplementedError

    def prune(self, cutoff: float, run_cutoff: float) -> tuple[int, int]:
        """Delete the rows older than `cutoff` (a time.time()), this run's older than
        `run_cutoff` too: (decisions deleted, of them this run's)."""
        raise NotImplementedError

    def close(self):
        raise NotImplementedError


class SqliteLog(LogFile):
    def _open(self):
        self.db = sqlite3.connect(str(self.path), timeout=5.0, check_same_thread=False)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            # FULL: each batch's commit is on the disk before the next (0.2 ms here, about five a
            # second). NORMAL, in WAL mode, may roll back every commit since the last checkpoint
            # (up to 1,000 pages: minutes of decisions) when the power goes.
            self.db.execute("PRAGMA synchronous=FULL")
            self.synchronous = self.db.execute("PRAGMA synchronous").fetchone()[0]     # 2: FULL
            self.db.executescript(SCHEMA)
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(decisions)")}
            for column in ("part_id", "saved", "product", "capture"):      # a log started by an older lineside
                if column not in columns:
                    self.db.execute(f"ALTER TABLE decisions ADD COLUMN {column} TEXT")
            if "anomaly_score" not in columns:
                self.db.execute("ALTER TABLE decisions ADD COLUMN anomaly_score REAL")
            info = self.run_info
            cur = self.db.execute(
                "INSERT INTO runs (started, source, model, model_sha256, labels, settings) VALUES (?,?,?,?,?,?)",
                (time.time(), info.get("source"), info.get("model"), info.get("model_sha256"),
                 json.dumps(info.get("labels")), json.dumps(info.get("settings"))))
            self.db.commit()
            self.db.execute(f"PRAGMA busy_timeout = {int(LOCK_WAIT_SECONDS * 1000)}")
        except BaseException:
            self.db.close()
            raise
        self.run_id = cur.lastrowid

    def write(self, decisions, events, shadows=()):
        run = self.run_id
        try:
            self.db.executemany(
                f"INSERT INTO decisions ({','.join(DECISION_COLUMNS)}) VALUES ({','.join('?' * len(DECISION_COLUMNS))})",
                [(run, r.ts, r.frame, r.source, r.origin, r.label, r.confidence, r.top, r.verdict, r.decision,
                  json.dumps(r.probabilities), json.dumps(r.flags), r.latency_ms, r.capture_to_decision_ms,
                  r.model_sha256, r.part_id, r.saved, r.product, r.capture, r.anomaly_score) for r in decisions])
            self.db.executemany("INSERT INTO events (run, ts, kind, detail) VALUES (?,?,?,?)",
                                [(run, e.ts, e.kind, e.detail) for e in events])
            if shadows:
                self.db.executemany(
                    "INSERT INTO shadow (run, ts, frame, label, confidence, verdict, model_sha256, active_label, "
                    "active_verdict, agrees) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    [(run, r.ts, r.frame, r.label, r.confidence, r.verdict, r.model_sha256, r.active_label,
                      r.active_verdict, int(r.agrees)) for r in shadows])
            self.db.commit()
        except BaseException:
            self.db.rollback()
            raise

    def annotate(self, row: DecisionRow):
        """A frame kept after its decision was written (a shadow disagreement): the row
        names its saved file and why."""
        self.db.execute("UPDATE decisions SET saved=?, capture=? WHERE run=? AND frame=?",
                        (row.saved, row.capture, self.run_id, row.frame))
        self.db.commit()

    def finish(self, summary):
        self.db.execute("UPDATE runs SET ended=?, summary=? WHERE id=?",
                        (time.time(), json.dumps(summary), self.run_id))
        self.db.commit()

    def prune(self, cutoff, run_cutoff):
        """Oldest first, PRUNE_BATCH rows at a time, by id (the order they were written in),
        so that each pass reads only what it deletes and one more batch; the pages freed are
        reused by the next rows, so the file stops growing."""
        deleted = mine = 0
        old = "ts < ? AND (run != ? OR ts < ?)"
        args = (cutoff, self.run_id, run_cutoff)
        try:
            for table in ("decisions", "events", "shadow"):
                while True:
                    oldest = f"SELECT id FROM {table} ORDER BY id LIMIT {PRUNE_BATCH}"
                    if table == "decisions":
                        mine += self.db.execute(f"SELECT count(*) FROM decisions WHERE id IN ({oldest}) AND {old} "
                                                "AND run = ?", (*args, self.run_id)).fetchone()[0]
                    cur = self.db.execute(f"DELETE FROM {table} WHERE id IN ({oldest}) AND {old}", args)
                    self.db.commit()
                    deleted += cur.rowcount if table == "decisions" else 0
                    if cur.rowcount < PRUNE_BATCH:
                        break
        except BaseException:
            self.db.rollback()
            raise
        return deleted, mine

    def close(self):
        self.db.close()     # closing twice is harmless


class JsonLinesLog(LogFile):
    """Appends whole lines with one write() each batch; a write that fails part way is cut
    back, so the file never holds half a line."""

    def _open(self):
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            self._append([{"type": "run", "ts": time.time(), **self.run_info}])
        except BaseException:
            self.close()
            raise

    def _append(self, objects: list[dict]):
        data = "".join(json.dumps(o) + "\n" for o in objects).encode("utf-8")
        size = os.fstat(self.fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            os.fsync(self.fd)       # on the disk, not in the page cache: a power cut keeps the batch
        except OSError:
            try:   # cut back our partial batch; not when the file grew by more than it (another writer)
                if 0 < os.fstat(self.fd).st_size - size <= len(data):
                    os.ftruncate(self.fd, size)
            except OSError:
                pass
            raise

    def write(self, decisions, events, shadows=()):
        self._append([{"type": "decision", **r.as_dict()} for r in decisions]
                     + [{"type": "event", "ts": e.ts, "kind": e.kind, "detail": e.detail} for e in events]
                     + [{"type": "shadow", **{k: getattr(r, k) for k in r.__slots__}} for r in shadows])

    def annotate(self, row: DecisionRow):
        self._append([{"type": "capture", "ts": time.time(), "frame": row.frame, "saved": row.saved,
                       "capture": row.capture}])

    def finish(self, summary):
        self._append([{"type": "end", "ts": time.time(), "summary": summary}])

    def close(self):
        fd, self.fd = self.fd, None
        if fd is not None:     # never close a descriptor number twice: it may be another file's by then
            os.close(fd)


def open_log(path: Path, run_info: dict) -> LogFile:
    """The log for --log PATH, opened, with one-line errors for paths that cannot be used."""
    writer = (SqliteLog if log_kind(path) == "sqlite" else JsonLinesLog)(path, run_info)
    try:
        writer.open()
    except sqlite3.DatabaseError as exc:
        raise LinesideError(f"--log {path}: not a usable SQLite database ({exc})") from exc
    except OSError as exc:
        raise LinesideError(f"--log {path}: cannot be written ({_reason(exc)})") from exc
    return writer


def is_fault(exc: BaseException) -> bool:
    """A failure of the log file (full disk, a lock, a removed folder: retry the same rows
    later), as opposed to a row whose content the format refused (retrying cannot help)."""
    if isinstance(exc, OSError):
        return True
    return isinstance(exc, sqlite3.Error) and not isinstance(
        exc, (sqlite3.InterfaceError, sqlite3.ProgrammingError, sqlite3.DataError, sqlite3.IntegrityError))


def _row_remains(row: DecisionRow, exc: BaseException) -> str:
    """What a `row_unwritable` event keeps of a decision the log refused."""
    kept = {}
    for name in ("ts", "frame", "label", "confidence", "verdict", "decision", "part_id", "origin"):
        try:
            kept[name] = json.loads(json.dumps(getattr(row, name), allow_nan=False))
        except Exception:  # noqa: BLE001 - keep what can be kept
            kept[name] = printable(repr(getattr(row, name, None)))[:200]
    return printable(f"decision not written as a row ({type(exc).__name__}: {exc}): {json.dumps(kept)}")


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__


# --- the recorder ----------------------------------------------------------------------

class Recorder:
    """The camera loop's one place to put decisions and events (never blocks it). A writer
    thread writes them to the log (see open_log) and saves the frames `save` asks for."""

    def __init__(self, log_path: Path | None, run_info: dict, save: SavePolicy | None = None,
                 buffer_rows: int = LOG_BUFFER_ROWS, outputs: tuple[Output, ...] = (),
                 keep_days: float | None = None):
        self.state = StationState()     # what every output reports of the station, updated here first
        self.outputs = list(outputs)    # fed every decision and event, never blocking (runtime/outputs.py)
        for output in self.outputs:
            output.attach(self.state)
        self.output_errors = 0
        self.path = Path(log_path) if log_path else None
        self.saver = FrameSaver(save) if save else None
        self._images_queued = 0   # frames put on the writer's queue (it counts those it took)
        self.save_skipped = 0     # frames not saved because saving fell behind
        if keep_days and self.path is not None and log_kind(self.path) != "sqlite":
            raise LinesideError(f"--log-keep-days: only a SQLite --log can drop its old rows ({self.path} is "
                                "JSON lines; rotate it with the system's logrotate)")
        self.writer = LogWriter(self.path, run_info, self.saver, buffer_rows, self.counts, keep_days)
        self.disk_low = False
        self._disk_checked = -DISK_CHECK_SECONDS
        self._queue = self.writer.queue

    # the writer's counters, read here
    written = property(lambda self: self.writer.written)
    not_logged = property(lambda self: self.writer.not_logged)
    error = property(lambda self: self.writer.error)

    @property
    def save_failed(self) -> int:
        return self.save_skipped + (self.saver.failed if self.saver else 0)

    def saving_backlog(self) -> int:
        """Frames handed to the writer and not yet taken by it."""
        return self._images_queued - self.writer.images_taken

    # -- called by the camera loop ---------------------------------------------------------

    def decision(self, row: DecisionRow, image: np.ndarray | None = None):
        if self.error:
            raise LinesideError(f"the recorder stopped ({self.error})")
        keep = None
        if image is not None and self.saver is not None and self.saver.policy.wants(row):
            if self._images_queued - self.writer.images_taken < MAX_QUEUED_IMAGES:
                keep = image
                self._images_queued += 1
                row.saved = self.saver.name(row)
            else:
                self.save_skipped += 1
                self.event("save_failed", f"frame {row.frame}: not saved, saving is behind "
                                          f"({MAX_QUEUED_IMAGES} frames waiting)")
        self._queue.put((row, keep))
        self.state.on_decision(row)
        for output in self.outputs:
            self._to_output(output.decision, row)
        if self.path is not None and time.monotonic() - self._disk_checked >= DISK_CHECK_SECONDS:
            self._check_disk()

    def _check_disk(self):
        """A `disk_low` event (log, MQTT, OPC UA's LastError, the page) when the log's file
        system has less than DISK_LOW_MB free ($LINESIDE_DISK_LOW_MB), before a full disk makes decisions wait in
        memory; `disk_ok` when it has twice that again."""
        self._disk_checked = time.monotonic()
        try:
            low = float(os.environ.get(DISK_LOW_ENV, DISK_LOW_MB)) * 2**20
            st = os.statvfs(self.path.parent)
        except (OSError, ValueError):
            return
        free = st.f_bavail * st.f_frsize
        if not self.disk_low and free < low:
            self.disk_low = True
            try:
                size = f"{os.stat(self.path).st_size / 2**20:.0f} MB"
            except OSError:
                size = "its size unknown"
            self.event("disk_low", f"{free / 2**20:.0f} MB free where the log is ({self.path}, {size}); when it "
                                   "is full, decisions wait in memory: free space, or give --log-keep-days")
        elif self.disk_low and free > 2 * low:
            self.disk_low = False
            self.event("disk_ok", f"{free / 2**20:.0f} MB free where the log is ({self.path})")

    def shadow(self, row):
        """A shadow model's decision (runtime/shadow.py): to the log alone, never to the outputs."""
        self._queue.put(("shadow", row))

    def keep(self, row: DecisionRow, image: np.ndarray, reason: str) -> bool:
        """Keep a frame for labelling after its decision went by (a shadow disagreement),
        when --save-when worth asks for such frames and the hour's quota has room; its
        row in the log then names the file. Any thread; never blocks."""
        policy = self.saver.policy if self.saver else None
        if policy is None or "worth" not in policy.when or row.saved is not None:
            return False
        kept = replace(row)                    # the loop's row may be being written: a copy carries the name
        if not policy.worth(kept, reason):
            return False
        kept.saved = self.saver.name(kept)
        self._queue.put(("keep", kept, image))
        return True

    def event(self, kind: str, detail: str = ""):
        event = Event(time.time(), kind, detail)
        log.log(logging.INFO if kind in NOT_ERRORS else logging.WARNING, "%s: %s", event.kind, event.detail)
        self._queue.put(event)
        self.state.on_event(event)
        for output in self.outputs:
            self._to_output(output.event, event)

    def _to_output(self, call, *args):
        """One failing output never stops the log, the other outputs or the loop."""
        try:
            call(*args)
        except Exception as exc:  # noqa: BLE001 - counted and logged, never raised into the loop
            self.output_errors += 1
            if self.output_errors == 1 or self.output_errors % 1000 == 0:
                log.error("output %s failed (%d so far): %s", type(call.__self__).__name__, self.output_errors, exc)

    def to_outputs(self, method: str, *args):
        """Call `method` of every output (observe, answer, product_changed, watch), each
        failure counted as in decision()."""
        for output in self.outputs:
            self._to_output(getattr(output, method), *args)

    def close(self, summary: dict | None = None):
        """Write everything queued, then the run summary, and close the file; then close
        the other outputs."""
        self._queue.put(("close", summary or {}))
        self.writer.join()
        self.state.end()
        for output in self.outputs:
            try:
                output.close(summary)
            except Exception as exc:  # noqa: BLE001
                self.output_errors += 1
                log.error("output %s failed to close: %s", type(output).__name__, exc)
        if self.error:
            raise LinesideError(f"the recorder stopped ({self.error})")

    def counts(self) -> dict:
        w = self.writer
        out = {"logged": w.written, "not_logged": w.not_logged, "unwritable_rows": w.unwritable_rows,
               "log_recreated": w.recreated, "deleted_with_log": w.deleted_with_log, "pruned": w.pruned,
               "saved": self.saver.saved if self.saver else 0, "save_failed": self.save_failed}
        for output in self.outputs:
            out.update(output.counters())
        if self.output_errors:
            out["output_errors"] = self.output_errors
        return out


class LogWriter:  # over 200 lines: writing, retrying, salvaging and recreating the log share one buffer
    """The Recorder's writer thread: takes decisions, events and frames off its queue in
    batches, saves the frames, writes the log (keeping what the file refuses, bounded,
    and retrying), and writes the run's summary at the end. Its counters are the run's."""

    def __init__(self, path: Path | None, run_info: dict, saver: FrameSaver | None, buffer_rows: int,
                 summary_counts, keep_days: float | None = None):
        self.path = path
        self.keep_days = keep_days   # --log-keep-days: rows older than this are deleted every PRUNE_SECONDS
        self.pruned = 0              # decisions deleted for it (all runs')
        self._pruned_at = None
        self._started = (time.time(), time.monotonic())
        self.saver = saver
        self.log = open_log(self.path, run_info) if self.path else None
        self.buffer_rows = buffer_rows
        self.summary_counts = summary_counts      # () -> the run's counts, for the summary at the end
        self.queue: queue.Queue = queue.Queue()
        self._rows: deque[DecisionRow] = deque()
        self._events: deque[Event] = deque()
        self._shadows: deque = deque(maxlen=LOG_BUFFER_ROWS)   # a shadow model's decisions: the log alone gets them
        self.images_taken = 0     # frames taken off the queue (the Recorder counts those put on it)
        self.written = 0          # decisions in the log file now
        self.not_logged = 0       # decisions that never reached the log (buffer full, or unwritable at the end)
        self.deleted_with_log = 0  # decisions written to a log file that was then deleted or replaced
        self.recreated = 0
        self.unwritable_rows = 0  # decisions the log refused for their content: kept as row_unwritable events
        self.error: BaseException | None = None   # the thread itself failed (a bug, not a fault)
        self._failing: dict | None = None
        self._thread = threading.Thread(target=self._run, name="lineside-recorder", daemon=True)
        self._thread.start()

    def join(self):
        self._thread.join()

    def _run(self):
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - surfaced to the loop on its next decision()
            self.error = exc
            log.exception("the recorder stopped")

    def _loop(self):
        while True:
            closing = None
            images, keeps = [], []
            wait = RETRY_SECONDS if self._failing else None
            try:
                item = self.queue.get(timeout=wait)
            except queue.Empty:
                item = None
            deadline = time.monotonic() + BATCH_SECONDS
            n = 0
            while item is not None:
                if isinstance(item, Event):
                    self._events.append(item)
                elif item[0] == "shadow":
                    self._shadows.append(item[1])
                elif item[0] == "keep":
                    keeps.append((item[1], item[2]))
                elif item[0] == "close":
                    closing = item[1]
                    break
                else:
                    row, image = item
                    self._rows.append(row)
                    if image is not None:
                        images.append((row, image))
                n += 1
                if n >= BATCH_ROWS:
                    break
                try:
                    item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
            if images:       # first, so that a frame that could not be saved is not named in the log
                self.images_taken += len(images)
                self.saver.save_batch(images, self._events)
            if self._flush() and self.keep_days:
                self._prune()
            if keeps:
                self.saver.keep_after(keeps, self.log, self._events)
            if closing is not None:
                self._close(closing)
                return

    def _flush(self) -> bool:
        """Write the waiting decisions and events; keep them (bounded) when the log fails."""
        if self.log is None:
            self._rows.clear()
            self._events.clear()
            self._shadows.clear()
            return True
        if not self._rows and not self._events and not self._shadows and not self._failing:
            return True
        events = list(self._events)
        try:
            if self.log.replaced():
                self._recreate()
                events = list(self._events)
            if self._failing:
                events.append(self._recovered_event())
            try:
                self.log.write(list(self._rows), events, list(self._shadows))
            except Exception as exc:  # noqa: BLE001 - sorted by is_fault: the file's, or the content's
                if is_fault(exc):
                    raise
                self._salvage(exc)       # raises a fault of the file itself, if one comes up meanwhile
            else:
                self.written += len(self._rows)
                self._rows.clear()
                self._events.clear()
                self._shadows.clear()
        except (OSError, sqlite3.Error) as exc:
            self._failed(exc)
            return False
        if self._failing:
            log.warning("log_unwritable: %s", events[-1].detail)
            self._failing = None
        return True

    def _prune(self):
        """--log-keep-days: the log's rows older than that deleted, at the start and every
        PRUNE_SECONDS; a `log_pruned` event says how many. A failure is an event, and the
        rows are tried again next time: nothing of the run's own writing depends on it."""
        now = time.monotonic()
        if self._pruned_at is not None and now - self._pruned_at < PRUNE_SECONDS:
            return
        self._pruned_at = now
        keep = self.keep_days * 86400.0
        # This run's rows by the clock it started with, carried on by the monotonic one: a clock
        # set forward (a box without a battery clock meeting NTP) must not make them look old.
        since_start = self._started[0] + (now - self._started[1])
        try:
            deleted, mine = self.log.prune(time.time() - keep, min(time.time(), since_start) - keep)
        except (OSError, sqlite3.Error) as exc:
            self._events.append(Event(time.time(), "log_prune_failed", f"{self.path}: {_reason(exc)}"))
            return
        if deleted:
            self.pruned += deleted
            self.written -= mine
            self._events.append(Event(time.time(), "log_pruned", f"{deleted} decisions older than "
                                                                 f"{self.keep_days:g} days deleted (--log-keep-days)"))

    def _salvage(self, exc: BaseException):
        """A batch the log refused for its content (a value no format can hold), not for the
        file: written one item at a time, so that one bad row costs only itself. A decision
        that cannot be written becomes a `row_unwritable` event holding what could be kept
        of it (counted in unwritable_rows); an event that cannot be written is dropped with
        an error line. A fault of the file itself meanwhile is raised, with what is left
        kept for the retry."""
        log.error("%s: a batch could not be written as it is (%s: %s); writing it row by row",
                  self.path, type(exc).__name__, exc)
        while self._rows:
            row = self._rows[0]
            try:
                self.log.write([row], [])
                self.written += 1
            except Exception as err:  # noqa: BLE001
                if is_fault(err):
                    raise
                self.unwritable_rows += 1
                self._events.append(Event(time.time(), "row_unwritable", _row_remains(row, err)))
            self._rows.popleft()
        while self._events:
            try:
                self.log.write([], [self._events[0]])
            except Exception as err:  # noqa: BLE001
                if is_fault(err):
                    raise
                log.error("%s: an event could not be written (%s: %s)", self.path, type(err).__name__, err)
            self._events.popleft()
        if self._shadows:
            try:
                self.log.write([], [], list(self._shadows))
            except Exception as err:  # noqa: BLE001
                if is_fault(err):
                    raise
                log.error("%s: %d shadow decisions could not be written (%s)", self.path, len(self._shadows), err)
            self._shadows.clear()

    def _failed(self, exc: BaseException):
        now = time.time()
        if self._failing is None:
            self._failing = {"since": now, "reason": _reason(exc), "dropped": 0, "first_frame": None}
            log.error("%s: the log cannot be written (%s); decisions wait in memory and the write is retried",
                      self.path, _reason(exc))
        self._failing["reason"] = _reason(exc)
        while len(self._rows) > self.buffer_rows:
            self._rows.popleft()
            self._failing["dropped"] += 1
            self.not_logged += 1
        while len(self._events) > LOG_BUFFER_EVENTS:
            self._events.popleft()

    def _recovered_event(self) -> Event:
        f = self._failing
        detail = (f"{self.path}: could not be written for {time.time() - f['since']:.1f} s ({f['reason']}); "
                  f"{len(self._rows)} decisions waited in memory and are written now")
        if f["dropped"]:
            detail += (f"; {f['dropped']} older decisions did not fit in the buffer of {self.buffer_rows} "
                       "and are not in the log (counted in not_logged)")
        return Event(time.time(), "log_unwritable", detail)

    def _recreate(self):
        """The log file was deleted or replaced: close ours, start a new one at the path."""
        gone = self.written
        try:
            self.log.close()
        except (OSError, sqlite3.Error):
            pass
        self.log.open()          # raises when the path cannot be written now: retried later
        self.recreated += 1
        self.deleted_with_log += gone
        self.written = 0
        self._events.appendleft(Event(time.time(), "log_recreated",
                                      f"{self.path} was deleted or replaced during the run; a new log was started "
                                      f"(the {gone} decisions written before went with the old file)"))
        log.warning("log_recreated: %s", self._events[0].detail)

    def _close(self, summary: dict):
        deadline = time.monotonic() + CLOSE_RETRY_SECONDS
        while not self._flush() and time.monotonic() < deadline:
            time.sleep(RETRY_SECONDS)
        if self.log is None:
            return
        try:
            if self.log.replaced():   # deleted after the last batch: the summary still goes somewhere
                self._recreate()
        except (OSError, sqlite3.Error):
            pass
        if self._rows:
            self.not_logged += len(self._rows)
            log.error("%s: %d decisions could not be logged before the run ended (%s)",
                      self.path, len(self._rows), self._failing["reason"] if self._failing else "")
            self._rows.clear()
        try:
            self.log.finish(dict(summary, **self.summary_counts()))
        except (OSError, sqlite3.Error) as exc:
            log.error("%s: the run's summary could not be written (%s)", self.path, _reason(exc))
        try:
            self.log.close()
        except (OSError, sqlite3.Error):
            pass
