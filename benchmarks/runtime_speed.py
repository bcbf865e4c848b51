#!/usr/bin/env python
"""The camera loop against benchmark_app, the naive loop and the raw backend, in one run.

    python benchmarks/runtime_speed.py neu10-bundle --video neu.mp4 --roi 80,0,480,480 \
        --seconds 10 --long 600 --out runtime_speed.json

For each precision: benchmark_app throughput (the reference), then `lineside bench`
unpaced (pipeline, naive and raw FPS, and the ceiling that decoding leaves: see
lineside.runtime.bench.ceiling_fps), then paced at 30 FPS (capture-to-decision
latency, drops). With --long N, `lineside run --pace 30` for N seconds with a SQLite
log, and the capture-to-decision p50/p99 of each minute read back from the log,
to show whether latency grows; its peak RSS is that of the `lineside run` process.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from lineside.metadata import ModelMetadata

sys.path.insert(0, str(Path(__file__).resolve().parent))
from openvino_speed import throughput  # noqa: E402


def lineside(*args) -> dict:
    cmd = [str(Path(sys.executable).with_name("lineside")), *map(str, args), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


def per_minute(db: Path) -> list[dict]:
    with sqlite3.connect(db) as con:
        rows = np.array(con.execute("SELECT ts, capture_to_decision_ms FROM decisions ORDER BY id").fetchall())
    minute = ((rows[:, 0] - rows[0, 0]) // 60).astype(int)
    return [{"minute": int(m), "frames": int((minute == m).sum()),
             "p50": round(float(np.percentile(rows[minute == m, 1], 50)), 2),
             "p99": round(float(np.percentile(rows[minute == m, 1], 99)), 2)} for m in np.unique(minute)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--video", required=True, type=Path)
    ap.add_argument("--roi", default=None)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--long", type=int, default=0, help="Seconds of a paced `lineside run` (0: skip).")
    ap.add_argument("--precisions", default="fp32,int8")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    meta = ModelMetadata.from_dict(json.loads((args.bundle / "bundle.json").read_text())["metadata"])
    shape = f"{meta.input_name}[1,{meta.spec.height},{meta.spec.width},3]"
    roi = ["--roi", args.roi] if args.roi else []
    results = {}
    for precision in args.precisions.split(","):
        xml = args.bundle / f"model_{precision}.xml"
        extra = ["-infer_precision", "f32"] if precision == "fp32" else []
        r = {"benchmark_app_fps": throughput(xml, shape, args.seconds, extra)}
        r["unpaced"] = lineside("bench", args.bundle, "--source", args.video, *roi, "--precision", precision,
                                "--seconds", args.seconds)
        r["paced30"] = lineside("bench", args.bundle, "--source", args.video, *roi, "--precision", precision,
                                "--seconds", args.seconds, "--pace", 30)
        r["fps_vs_benchmark_app"] = round(r["unpaced"]["fps"] / r["benchmark_app_fps"], 3)
        u, p = r["unpaced"], r["paced30"]
        print(f"{precision}: benchmark_app {r['benchmark_app_fps']:.1f} FPS | pipeline {u['fps']:.1f} FPS "
              f"({r['fps_vs_benchmark_app']:.2f}x benchmark_app, {u['fps_vs_naive']:.2f}x naive {u['naive_fps']:.1f}, "
              f"{u['fps_vs_raw']:.2f}x raw {u['raw_fps']:.1f}, {u.get('fps_vs_ceiling', 0):.2f}x ceiling "
              f"{u.get('ceiling_fps', 0):.1f} from decode {u.get('decode_fps', 0):.1f}) | paced 30: p50 {p['latency_ms']['p50']:.2f} ms "
              f"p99 {p['latency_ms']['p99']:.2f} ms, dropped {p['dropped']}, RSS {p['rss_mb']:.0f} MB", flush=True)
        results[precision] = r
    if args.long:
        precision = args.precisions.split(",")[-1]
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "long.sqlite"
            summary = lineside("run", args.bundle, "--source", args.video, *roi, "--precision", precision, "--loop",
                               "--pace", 30, "--seconds", args.long, "--log", db)
            minutes = per_minute(db)
        results["long"] = {"precision": precision, "seconds": args.long, "frames": summary["frames"],
                           "dropped": summary["dropped"], "rss_mb": summary["rss_mb"],
                           "latency_ms": summary["latency_ms"], "per_minute": minutes}
        print(f"long run ({precision}, {args.long} s paced at 30): {summary['frames']} frames, dropped "
              f"{summary['dropped']}, p99 {summary['latency_ms']['p99']:.2f} ms, peak RSS {summary['rss_mb']:.0f} MB")
        for m in minutes:
            print(f"  minute {m['minute']:2d}: {m['frames']} frames, p50 {m['p50']:.2f} ms, p99 {m['p99']:.2f} ms")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
