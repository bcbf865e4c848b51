"""Shadow mode: `lineside run BUNDLE --shadow CANDIDATE` decides every frame it has time for
with a candidate model too, and logs its decisions beside the line's without sending them
anywhere: no MQTT, OPC UA, Modbus, trigger answer or saved frame comes from the shadow.

The shadow has its own thread, engine, preprocessing (its own input size; the line's ROI)
and decider (the line's OK classes, threshold and vote). The loop hands it a frame once
the line has decided it; a frame that comes while the shadow is still busy with the last
one is not shadowed (counted in `skipped`), so the line never waits for the shadow: on a
box without headroom the shadow covers fewer frames (`coverage` in the summary, the page
and /metrics), never at the line's expense.

`lineside compare LOG` reads both back: agreement, where they disagree (with the frames),
each model's NG and unknown rate. POST /api/shadow/promote and POST /api/rollback (with
the page's token) make the shadow the line's model, or bring the previous one back,
between two frames; each is an event naming who asked for it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass

from lineside.errors import LinesideError
from lineside.text import printable

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ShadowRow:
    ts: float
    frame: int
    label: str
    confidence: float
    verdict: str | None
    model_sha256: str
    active_label: str
    active_verdict: str | None
    agrees: bool

    def __post_init__(self):
        self.label, self.active_label = printable(self.label), printable(self.active_label)


class ShadowRunner(threading.Thread):
    """The candidate beside the line. offer() never blocks the loop."""

    def __init__(self, model, decider, roi, recorder):
        super().__init__(name="lineside-shadow", daemon=True)
        self.model, self.decider, self.roi, self.recorder = model, decider, roi, recorder
        self.engine = model.engine("latency")
        self.prep = None
        self._inbox: queue.Queue = queue.Queue(maxsize=1)
        self.offered = self.decided = self.skipped = self.failed = 0
        self.agree = 0
        self.counts = {"line": Counter(), "shadow": Counter()}
        self.active = True

    def offer(self, image, row, first_size):
        """The loop's call, after the line decided the frame (its row)."""
        if not self.active:
            return
        self.offered += 1
        try:
            self._inbox.put_nowait((image, row, first_size))
        except queue.Full:
            self.skipped += 1

    def run(self):
        from .loop import BadFrame, Preprocessor

        while True:
            item = self._inbox.get()
            if item is None:
                return
            image, row, first_size = item
            try:
                if self.prep is None:
                    self.prep = Preprocessor(self.model, self.roi, first_size=first_size)
                self.prep(image, self.engine.buffer(0))
                self.engine.submit(0)
                decision = self.decider(self.engine.wait(0))
            except (BadFrame, LinesideError) as exc:
                self.failed += 1
                log.debug("shadow: frame %s not decided (%s)", row.frame, exc)
                continue
            except Exception as exc:  # noqa: BLE001 - the shadow never stops the line
                self.failed += 1
                log.error("shadow: frame %s failed: %s", row.frame, exc)
                continue
            agrees = decision.label == row.label
            if not agrees:
                self.recorder.keep(row, image, "disagreement")
            self.decided += 1
            self.agree += agrees
            self.counts["line"][_outcome(row.label, row.verdict)] += 1
            self.counts["shadow"][_outcome(decision.label, decision.verdict)] += 1
            self.recorder.shadow(ShadowRow(time.time(), row.frame, decision.label, round(decision.confidence, 6),
                                           decision.verdict, self.model.checksum, row.label, row.verdict, agrees))

    def stop(self):
        self.active = False
        try:
            self._inbox.put(None, timeout=5)
        except queue.Full:
            pass
        self.join(timeout=30)

    def summary(self) -> dict:
        decided = max(self.decided, 1)
        return {"model_sha256": self.model.checksum, "active": self.active, "frames": self.decided,
                "skipped": self.skipped, "failed": self.failed,
                "coverage": round(self.decided / max(self.offered, 1), 4),
                "agreement": round(self.agree / decided, 4) if self.decided else None,
                "ng_rate": {who: round((c["NG"] + c["unknown"]) / decided, 4) if self.decided else None
                            for who, c in self.counts.items()}}


def _outcome(label: str, verdict: str | None) -> str:
    if label == "unknown":
        return "unknown"
    return verdict or "no verdict"


def compare_log(path, run: int | None = None, limit: int = 50) -> dict:
    """What `lineside compare LOG` reports: the line's and the shadow's decisions on the same
    frames of one run (the last that had a shadow, or `run`) of a SQLite log."""
    import sqlite3
    from pathlib import Path

    from .records import open_sqlite_log

    path = Path(path)
    try:
        db = open_sqlite_log(path, "compare")
        try:
            if run is None:
                found = db.execute("SELECT max(run) FROM shadow").fetchone()
                run = found[0] if found else None
            if run is None:
                raise LinesideError(f"{path}: no shadow decisions (run with --shadow BUNDLE)")
            rows = db.execute("SELECT s.frame, s.label, s.verdict, s.active_label, s.active_verdict, s.agrees, "
                              "s.model_sha256, d.saved, d.model_sha256 FROM shadow s LEFT JOIN decisions d "
                              "ON d.run = s.run AND d.frame = s.frame WHERE s.run = ? ORDER BY s.frame",
                              (int(run),)).fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise LinesideError(f"{path}: not a lineside log with shadow decisions ({exc})") from None
    if not rows:
        raise LinesideError(f"{path}: run {run} has no shadow decisions")
    confusion: dict = {}
    for _, label, _, active, *_ in rows:
        confusion.setdefault(active, Counter())[label] += 1
    n = len(rows)

    def rejected(label, verdict):
        return label == "unknown" or verdict == "NG"

    return {"log": str(path), "run": run, "frames": n,
            "agreement": round(sum(r[5] for r in rows) / n, 4),
            "line_model": rows[-1][8], "shadow_model": rows[-1][6],
            "reject_rate": {"line": round(sum(rejected(r[3], r[4]) for r in rows) / n, 4),
                            "shadow": round(sum(rejected(r[1], r[2]) for r in rows) / n, 4)},
            "confusion": {a: dict(c) for a, c in sorted(confusion.items())},
            "disagreements": [{"frame": r[0], "line": r[3], "shadow": r[1], "saved": r[7]}
                              for r in rows if not r[5]][:limit]}
