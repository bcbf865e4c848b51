"""`lineside score LOG --truth VIDEO.json`: a run of the line scored against what was
really in front of the camera, and the --reject-below and --vote that would have done
best. Torch-free; reads a SQLite decision log.

The truth is the JSON that `lineside data video --json` prints (the label of every part
in order, each in view for frames/parts frames), so a replayed video can be scored
without labelling frames. A part's answer is what the line gives with --vote N/M: the
first label that N of M consecutive frames agree on, else unknown; its verdict is OK
when that label is an OK class. An escape is a defective part called OK, a false call a
good part called NG (unknown counts NG, as on the line)."""

from __future__ import annotations

import json
import sqlite3
from collections import Counter, deque
from pathlib import Path

import numpy as np

from lineside.errors import LinesideError

from .records import open_sqlite_log

REJECT_GRID = (None, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
VOTES = ((1, 1), (2, 2), (2, 3), (3, 3), (3, 5))


def read_truth(path) -> tuple[list[str], int]:
    """(label of every part in order, frames each part is in view) from data video's JSON."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        labels, frames, parts = doc["labels"], int(doc["frames"]), int(doc["parts"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise LinesideError(f"--truth {path}: not the JSON of lineside data video --json ({exc})") from None
    if not isinstance(labels, list) or len(labels) != parts or parts < 1 or frames % parts:
        raise LinesideError(f"--truth {path}: its labels, parts and frames do not agree")
    return [str(x) for x in labels], frames // parts


def read_run(path, run: int | None = None) -> dict:
    """The decisions of one run (the last, or `run`) of a SQLite log: labels, settings and,
    per frame, the probabilities."""
    path = Path(path)
    try:
        db = open_sqlite_log(path, "score")
        try:
            if run is None:
                run = (db.execute("SELECT max(id) FROM runs").fetchone() or [None])[0]
            info = db.execute("SELECT labels, settings FROM runs WHERE id = ?", (run,)).fetchone()
            rows = db.execute("SELECT frame, probabilities FROM decisions WHERE run = ? ORDER BY frame",
                              (run,)).fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise LinesideError(f"{path}: not a lineside decision log ({exc})") from None
    if info is None or not rows:
        raise LinesideError(f"{path}: run {run} has no decisions")
    try:
        labels = json.loads(info[0])
        settings = json.loads(info[1] or "{}")
    except ValueError:
        raise LinesideError(f"{path}: run {run} has unreadable labels or settings") from None
    frames = {}
    for frame, probs in rows:
        try:
            p = json.loads(probs or "{}")
        except ValueError:
            p = {}
        frames[int(frame)] = [float(p.get(name, 0.0)) for name in labels] if p else None
    return {"run": run, "labels": labels, "settings": settings, "frames": frames}


def part_label(frame_labels, vote: tuple[int, int]) -> str:
    """The first label that `vote[0]` of any `vote[1]` consecutive frames agree on."""
    n, m = vote
    window: deque = deque(maxlen=m)
    for label in frame_labels:
        window.append(label)
        best, count = Counter(window).most_common(1)[0]
        if count >= n:
            return best
    return "unknown"


def score_log(log, truth, ok_classes=None, run: int | None = None) -> dict:
    parts, hold = read_truth(truth)
    r = read_run(log, run)
    labels = r["labels"]
    ok_text = ok_classes or r["settings"].get("ok_classes")
    if not ok_text:
        raise LinesideError("--ok-classes: which labels mean OK? (the run did not say: it ran without --ok-classes)")
    ok = {c.strip() for c in str(ok_text).split(",") if c.strip()} if isinstance(ok_text, str) else set(ok_text)
    unknown = sorted(ok - set(labels))
    if unknown:
        raise LinesideError(f"--ok-classes: {', '.join(unknown)} not among the model's labels ({', '.join(labels)})")
    if list(labels) == ["good", "anomalous"]:   # an anomaly model: every folder but the good ones is a defect
        parts = ["good" if p in ok or p == "good" else "anomalous" for p in parts]
    missing = sorted(set(parts) - set(labels))
    if missing:
        raise LinesideError(f"--truth: label(s) {', '.join(missing)} are not the model's ({', '.join(labels)})")
    frames = r["frames"]
    # the loop numbers frames from 1, in the order the source gave them
    per_part = [[frames.get(p * hold + k + 1) for k in range(hold)] for p in range(len(parts))]
    decided = sum(1 for fr in per_part for f in fr if f is not None)
    rows = []
    for reject in REJECT_GRID:
        for vote in VOTES:
            if vote[1] > hold:
                continue
            escapes = false_calls = right = 0
            for truth_label, fr in zip(parts, per_part):
                seq = []
                for p in fr:
                    if p is None:
                        seq.append("unknown")     # a frame not decided: the fail-safe answer
                        continue
                    i = int(np.argmax(p))
                    seq.append("unknown" if reject is not None and p[i] < reject else labels[i])
                called = part_label(seq, vote)
                right += called == truth_label
                called_ok, truly_ok = called in ok, truth_label in ok
                escapes += truly_ok is False and called_ok
                false_calls += truly_ok and not called_ok
            rows.append({"reject_below": reject, "vote": f"{vote[0]}/{vote[1]}", "escapes": escapes,
                         "false_calls": false_calls, "right": right})
    best = min(rows, key=lambda x: (x["escapes"], x["false_calls"], -x["right"]))
    settings = r["settings"]
    as_run = {"reject_below": settings.get("reject_below"), "vote": settings.get("vote")}
    return {"log": str(log), "run": r["run"], "truth": str(truth), "parts": len(parts), "frames_per_part": hold,
            "frames_decided": decided, "ok_classes": sorted(ok),
            "good_parts": sum(p in ok for p in parts), "defective_parts": sum(p not in ok for p in parts),
            "as_run": as_run, "sweep": rows, "best": best}
