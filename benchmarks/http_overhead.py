#!/usr/bin/env python
"""Does the status page slow the camera loop? `lineside bench` with and without --http
(the page served and read as an open browser reads it), alternated in one run so that
both see the same machine, free-running (frames per second) and paced at camera rate
(capture-to-decision latency).

    python benchmarks/http_overhead.py demo-out/bundle --rounds 4 --seconds 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from lineside.runtime.bench import bench
from lineside.runtime.model import open_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--source", default=None, help="a video file (default: bench's synthetic video)")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--pace", type=float, default=30.0, help="camera rate of the paced runs")
    ap.add_argument("--port", type=int, default=8779)
    args = ap.parse_args(argv)
    model = open_model(args.bundle, backend="openvino", precision=args.precision)
    rows = {"free": {"off": [], "on": []}, "paced": {"off": [], "on": []}}
    for r in range(args.rounds):
        for mode, pace in (("free", None), ("paced", args.pace)):
            order = ("off", "on") if r % 2 == 0 else ("on", "off")
            for http in order:
                res = bench(model, args.source, seconds=args.seconds, pace=pace, log=True, compare=False,
                            http=f"127.0.0.1:{args.port}" if http == "on" else None)
                rows[mode][http].append({"fps": res["fps"], "p50": res["latency_ms"]["p50"],
                                         "p99": res["latency_ms"]["p99"], "dropped": res["dropped"],
                                         "page_reads": res.get("http", {}).get("page_reads", 0)})
                print(json.dumps({"round": r, "mode": mode, "http": http, **rows[mode][http][-1]}), flush=True)
    summary = {}
    for mode, key in (("free", "fps"), ("paced", "p50"), ("paced", "p99")):
        off = [x[key] for x in rows[mode]["off"]]
        on = [x[key] for x in rows[mode]["on"]]
        summary[f"{mode}_{key}"] = {"off_mean": round(statistics.mean(off), 2), "on_mean": round(statistics.mean(on), 2),
                                    "off_range": [min(off), max(off)], "on_range": [min(on), max(on)],
                                    "on_vs_off": round(statistics.mean(on) / statistics.mean(off), 3)}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
