"""Review of saved frames: the decisions behind the frames `--save` kept, and the operator's
verdict on each, written as the next training set.

The decisions come from the run's SQLite log (`--log *.sqlite`, opened read-only), the
frames from the `--save` folder. A frame is found by its decision's id in the log and the
file name the log holds for it (checked against the names lineside gives its frames), never
by a path from a request. A reviewed frame is written, cropped to the run's --roi (what
the model saw), as `OUT/<label>/<name>.png`, and `OUT/manifest.csv` lists every reviewed
frame (`path,label` first, so `lineside train` reads it directly; then what the model said
and when it was reviewed). Reviewing a frame again moves it to its new label.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sqlite3
import stat
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from lineside.errors import LinesideError
from lineside.files import write_atomic
from lineside.images import decode_image

from .loop import parse_roi
from .records import SAVED_NAME, log_kind

VERDICTS = ("OK", "NG", "unknown", "flagged", "worth")   # worth: kept for labelling (--save-when worth)
LABEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}$")
MANIFEST = "manifest.csv"
MANIFEST_FIELDS = ("path", "label", "model_label", "confidence", "verdict", "decision_id", "frame_time",
                   "reviewed_at", "station", "model_sha256", "product", "capture")   # provenance after the label
MAX_ITEMS = 500
SAME_PART_DIFFERENCE = 6.0   # mean grey difference (0..255) of 16x16 thumbnails below which frames show one part


class ReviewStore:
    """Saved frames of one log and one --save folder, and the reviewed dataset in `out`."""

    def __init__(self, log_path, save_dir, out_dir=None, labels=None):
        self.log_path = Path(log_path)
        self.save_dir = Path(save_dir)
        self.out_dir = Path(out_dir) if out_dir else self.save_dir / "reviewed"
        if log_kind(self.log_path) != "sqlite":
            raise LinesideError(f"{self.log_path}: review reads a SQLite log (run with --log FILE.sqlite)")
        self.labels = list(labels) if labels else None
        self._lock = threading.Lock()
        self._thumbs = Thumbnails(self._frame_file)

    # -- reading the log ---------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection | None:
        if not self.log_path.is_file():
            return None      # the run has not written its first batch yet
        db = sqlite3.connect(f"file:{self.log_path}?mode=ro", uri=True, timeout=2.0, check_same_thread=False)
        db.row_factory = sqlite3.Row
        return db

    def _query(self, sql: str, args=()) -> list[sqlite3.Row]:
        db = self._connect()
        if db is None:
            return []
        try:
            return db.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such column" in str(exc) or "no such table" in str(exc):
                return []     # a log written before frames were named in it, or still empty
            raise
        finally:
            db.close()

    def known_labels(self) -> list[str]:
        if self.labels:
            return self.labels
        rows = self._query("SELECT labels FROM runs ORDER BY id DESC LIMIT 1")
        return json.loads(rows[0]["labels"]) if rows and rows[0]["labels"] else []


    def count(self, label: str | None = None, verdict: str | None = None) -> int:
        """How many decisions the filter matches that had a frame saved (some may since have
        been removed by --save-max-files / --save-max-mb)."""
        where, args = review_filters(label, verdict)
        rows = self._query(f"SELECT COUNT(*) AS n FROM decisions WHERE {' AND '.join(where)}", args)
        return int(rows[0]["n"]) if rows else 0

    def items(self, label: str | None = None, verdict: str | None = None, limit: int = 100,
              before: int | None = None) -> list[dict]:
        """Decisions with a saved frame that still exists, newest first (ids below `before`),
        filtered by the model's label and by verdict (OK, NG, unknown or flagged). Frames of
        one part share a `group` (see group_parts)."""
        where, args = review_filters(label, verdict)
        if before is not None:
            where.append("id < ?")
            args.append(int(before))
        limit = max(1, min(int(limit), MAX_ITEMS))
        rows = self._query(f"SELECT * FROM decisions WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",
                           (*args, limit * 2))
        reviewed = self.reviewed()
        out = []
        for r in rows:
            if self._frame_file(r["saved"]) is None:
                continue     # removed by --save-max-files / --save-max-mb, or never written
            out.append({"id": r["id"], "time": r["ts"], "frame": r["frame"], "label": r["label"],
                        "confidence": r["confidence"], "verdict": r["verdict"], "flags": json.loads(r["flags"] or "[]"),
                        "part_id": r["part_id"], "source": r["source"],
                        "capture": r["capture"] if "capture" in r.keys() else None,
                        "heatmap": self._frame_file(heatmap_name(r["saved"])) is not None,
                        "reviewed": reviewed.get(r["id"])})
            if len(out) >= limit:
                break
        thumbs = {r["id"]: r["saved"] for r in rows}
        return group_parts(out, lambda a, b: self._thumbs.alike(thumbs[a["id"]], thumbs[b["id"]]))


    def _row(self, decision_id: int) -> sqlite3.Row | None:
        rows = self._query("SELECT d.*, r.settings AS settings FROM decisions d LEFT JOIN runs r ON r.id = d.run "
                           "WHERE d.id = ?", (int(decision_id),))
        return rows[0] if rows else None

    def _frame_file(self, name: str | None) -> Path | None:
        """The saved frame of that name, only when it is a name lineside gives its frames and
        a plain file (a link put there, even named like a frame, is never followed)."""
        if not name or not SAVED_NAME.match(name) or os.sep in name or (os.altsep and os.altsep in name):
            return None
        path = self.save_dir / name
        try:
            return path if stat.S_ISREG(os.lstat(path).st_mode) else None
        except OSError:
            return None

    def frame_path(self, decision_id: int) -> Path | None:
        row = self._row(decision_id)
        return self._frame_file(row["saved"]) if row is not None else None

    def frame_bytes(self, decision_id: int, crop: bool = False, heatmap: bool = False) -> bytes | None:
        """The saved frame's bytes, read without following a link (O_NOFOLLOW), or None;
        with `crop`, the part of it the model saw (the run's --roi) as a JPEG; with
        `heatmap`, an anomaly model's overlay saved beside it (NAME.heatmap.jpg)."""
        row = self._row(decision_id)
        if heatmap:
            path = self._frame_file(heatmap_name(row["saved"])) if row is not None else None
            return None if path is None else read_plain_file(path)
        path = self._frame_file(row["saved"]) if row is not None else None
        data = None if path is None else read_plain_file(path)
        if data is None or not crop:
            return data
        settings = json.loads(row["settings"] or "{}") or {}    # a log written without settings: null
        if not settings.get("roi"):
            return data
        try:
            image = decode_image(data, path, cv2.IMREAD_COLOR)
        except LinesideError:
            return None
        ok, jpeg = cv2.imencode(".jpg", roi_crop(image, settings["roi"]), [cv2.IMWRITE_JPEG_QUALITY, 90])
        return jpeg.tobytes() if ok else None

    # -- the reviewed dataset --------------------------------------------------------------

    def reviewed(self) -> dict[int, dict]:
        """decision id -> {label, path} of every frame reviewed so far (from the manifest)."""
        path = self.out_dir / MANIFEST
        if not path.is_file():
            return {}
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return {int(r["decision_id"]): {"label": r["label"], "path": r["path"]}
                for r in rows if (r.get("decision_id") or "").isdigit()}

    def review(self, decision_id: int, label: str) -> dict:
        """Record the true label of a saved frame (the model's own label confirms it) and write
        its ROI crop into the dataset. Returns the manifest entry."""
        label = str(label).strip()
        if not LABEL_NAME.match(label) or label in (".", "..") or label.lower() == "unknown":
            raise LinesideError(f"label '{label[:80]}': use letters, digits, space, '_', '.' or '-' (at most 64), "
                                "and not 'unknown'")
        row = self._row(decision_id)
        if row is None:
            raise LookupError(f"no decision {decision_id} in {self.log_path}")
        source = self._frame_file(row["saved"])
        if source is None:
            raise LookupError(f"decision {decision_id} has no saved frame in {self.save_dir}")
        data = read_plain_file(source)
        if data is None:
            raise LookupError(f"decision {decision_id} has no saved frame in {self.save_dir}")
        image = decode_image(data, source, cv2.IMREAD_COLOR)     # BadImage (a LinesideError) names it
        settings = json.loads(row["settings"] or "{}") or {}    # a log written without settings: null
        crop = roi_crop(image, settings.get("roi"))
        name = Path(row["saved"]).with_suffix(".png").name
        with self._lock:
            entries = {e["decision_id"]: e for e in self._read_manifest()}
            old = entries.get(str(decision_id))
            folder = self.out_dir / label
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / name
            write_atomic(target, _png(crop))
            if old and Path(old["path"]) != Path(label) / name:
                stale = self.out_dir / old["path"]
                if stale.parent.parent == self.out_dir and stale.name == name:   # only a file we wrote
                    stale.unlink(missing_ok=True)
                    try:
                        stale.parent.rmdir()      # a label folder we made, now empty
                    except OSError:
                        pass
            entry = {"path": f"{label}/{name}", "label": label, "model_label": row["label"],
                     "confidence": row["confidence"], "verdict": row["verdict"] or "",
                     "decision_id": str(decision_id), "frame_time": row["ts"],
                     "reviewed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     "station": settings.get("station") or "", "model_sha256": row["model_sha256"] or "",
                     "product": _column(row, "product"), "capture": _column(row, "capture")}
            entries[str(decision_id)] = entry
            self._write_manifest(list(entries.values()))
        return entry

    def _read_manifest(self) -> list[dict]:
        path = self.out_dir / MANIFEST
        if not path.is_file():
            return []
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    def _write_manifest(self, entries: list[dict]):
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(entries)
        write_atomic(self.out_dir / MANIFEST, buf.getvalue().encode("utf-8"))


def heatmap_name(saved: str | None) -> str | None:
    """The overlay --save writes beside an anomaly model's NG frame NAME.jpg: NAME.heatmap.jpg."""
    return None if not saved else Path(saved).stem + ".heatmap.jpg"


def review_filters(label: str | None, verdict: str | None) -> tuple[list[str], list]:
    """The WHERE clauses (and their arguments) of the saved frames a filter shows."""
    if verdict is not None and verdict not in VERDICTS:
        raise LinesideError(f"verdict: '{verdict}' is not one of {', '.join(VERDICTS)}")
    where, args = ["saved IS NOT NULL"], []
    if label:
        where.append("label = ?")
        args.append(label)
    if verdict == "unknown":
        where.append("label = 'unknown'")
    elif verdict == "worth":
        where.append("capture IS NOT NULL")
    elif verdict == "flagged":
        where.append("flags NOT IN ('[]', '')")
    elif verdict:
        where.append("verdict = ?")
        args.append(verdict)
    return where, args


class Thumbnails:
    """16x16 grey thumbnails of saved frames, cached by file name, to tell whether two
    frames show the same scene."""

    def __init__(self, frame_file):
        self.frame_file = frame_file      # name -> the saved frame's path, or None
        self._cache: dict = {}

    def get(self, name: str):
        """A saved frame's thumbnail (decoded at an eighth of its size), or None."""
        if name not in self._cache:
            path = self.frame_file(name)
            data = read_plain_file(path) if path is not None else None
            image = None
            if data:
                image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_8)
            if len(self._cache) > 4 * MAX_ITEMS:
                self._cache.clear()
            self._cache[name] = None if image is None else cv2.resize(image, (16, 16),
                                                                        interpolation=cv2.INTER_AREA).astype(float)
        return self._cache[name]

    def alike(self, a: str, b: str) -> bool:
        """Whether two saved frames show the same scene (mean grey difference of their
        thumbnails under SAME_PART_DIFFERENCE)."""
        ta, tb = self.get(a), self.get(b)
        return ta is not None and tb is not None and float(abs(ta - tb).mean()) < SAME_PART_DIFFERENCE


def group_parts(items: list[dict], alike) -> list[dict]:
    """Give each item (newest first) a `group`: the id of the newest frame of its part. A
    part in front of the camera is decided on several frames in a row: consecutive frames
    of one source with the same label and part id (when triggered) are one part when
    `alike(a, b)` says the two frames show the same scene (a different part of the same
    class does not)."""
    previous = None
    for item in items:
        same = (previous is not None and item["frame"] == previous["frame"] - 1
                and item["label"] == previous["label"] and item["part_id"] == previous["part_id"]
                and item["source"] == previous["source"] and alike(item, previous))
        item["group"] = previous["group"] if same else item["id"]
        previous = item
    return items


def _column(row, name: str) -> str:
    """A decision's column that older logs lack, as text ('' when absent or empty)."""
    return (row[name] or "") if name in row.keys() else ""


def read_plain_file(path: Path) -> bytes | None:
    """A regular file's bytes, opened without following a symbolic link; None otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        return f.read()


def roi_crop(image, roi_text: str | None):
    """The part of a saved frame the model saw: the run's --roi when it fits the frame."""
    roi = parse_roi(roi_text) if roi_text else None
    if roi is None:
        return image
    x, y, w, h = roi
    if x + w > image.shape[1] or y + h > image.shape[0]:
        return image      # a frame the ROI did not fit was not classified; kept whole
    return image[y:y + h, x:x + w]


def _png(image) -> bytes:
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise LinesideError("the frame could not be encoded as PNG")
    return data.tobytes()
