#!/usr/bin/env python
"""How fast the decision log grows, what --log-keep-days holds it to, and what a commit
that reaches the disk costs.

    python benchmarks/log_growth.py
    python benchmarks/log_growth.py --classes 10 --rows 200000 --days 4 --keep 1

Decisions of --classes classes (every probability logged, as `lineside run` does) are
written through the Recorder into a SQLite log in a temporary folder:

- growth: bytes per decision and what that is per day at 30 FPS, with no limit;
- kept: the same rows spread over --days with --log-keep-days --keep, pruned at every
  batch (PRUNE_SECONDS 0): the file against the one with no limit;
- commit: the time of one commit of a 6-row batch (about 0.2 s at 30 FPS) with
  synchronous=NORMAL and FULL, in WAL mode, on the disk of --dir.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
from pathlib import Path

from lineside.runtime import records
from lineside.runtime.records import DecisionRow, Recorder


def _rows(classes: int, n: int, start: float, step: float):
    labels = [f"class_{i}" for i in range(classes)]
    probs = {c: round(0.9 if i == 0 else 0.1 / (classes - 1), 6) for i, c in enumerate(labels)}
    for i in range(n):
        yield DecisionRow(start + i * step, i, "rtsp://10.0.0.7/stream", "", labels[0], 0.9, labels[0], "OK", "OK",
                          probs, [], 4.0, 5.1, "b73e0f7991e2847b0e1fc056435af33c79a6c8b457ad3703a9e4c6fef9b0c839")


def _write(folder: Path, rows, keep: float | None) -> dict:
    path = folder / "log.sqlite"
    recorder = Recorder(path, {"source": "bench"}, keep_days=keep)
    for row in rows:
        recorder.decision(row)
    recorder.close({})
    size = sum(f.stat().st_size for f in folder.iterdir())
    return {"bytes": size, **{k: recorder.counts()[k] for k in ("logged", "pruned")}}


def _commit_ms(folder: Path, mode: str, commits: int = 200) -> float:
    db = sqlite3.connect(str(folder / f"{mode}.sqlite"))
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={mode}")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, ts REAL, p TEXT)")
    row = (time.time(), json.dumps({"ok": 0.9, "ng": 0.1}))
    t0 = time.perf_counter()
    for _ in range(commits):
        db.executemany("INSERT INTO t (ts, p) VALUES (?, ?)", [row] * 6)
        db.commit()
    db.close()
    return (time.perf_counter() - t0) / commits * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--days", type=float, default=4.0, help="the rows' timestamps span this many days")
    parser.add_argument("--keep", type=float, default=1.0, help="--log-keep-days for the kept log")
    parser.add_argument("--dir", type=Path, default=None, help="where the logs go (the disk that is measured)")
    args = parser.parse_args()
    records.PRUNE_SECONDS = 0.0
    start, step = time.time() - args.days * 86400, args.days * 86400 / args.rows
    report = {"classes": args.classes, "rows": args.rows}
    with tempfile.TemporaryDirectory(dir=args.dir) as a, tempfile.TemporaryDirectory(dir=args.dir) as b:
        full = _write(Path(a), _rows(args.classes, args.rows, start, step), None)
        kept = _write(Path(b), _rows(args.classes, args.rows, start, step), args.keep)
        per_row = full["bytes"] / args.rows
        report["growth"] = {"bytes_per_decision": round(per_row, 1),
                            "gb_per_day_at_30_fps": round(per_row * 30 * 86400 / 1e9, 2), "mb": round(full["bytes"] / 1e6, 1)}
        report["kept"] = {"keep_days": args.keep, "mb": round(kept["bytes"] / 1e6, 1), "logged": kept["logged"],
                          "pruned": kept["pruned"]}
        report["commit_ms"] = {mode: round(_commit_ms(Path(a), mode), 3) for mode in ("NORMAL", "FULL")}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
