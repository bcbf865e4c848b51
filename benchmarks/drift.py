#!/usr/bin/env python
"""Drift alarms on a real dataset: no alarm over an unchanged stream, and how soon one comes
after the light changes.

    python benchmarks/drift.py ../shared/datasets/neu-det --frames 10000 --gamma 0.7

The reference is built as export builds it (runtime.drift.build_reference) from up to 300
images at the model's input size (224 px); the stream draws the other images, each held
--hold frames, through a DriftMonitor with the run's defaults (window 300, every 30).
Reported: alarms over --frames unchanged frames, then the frames until the alarm after
every image is given a gamma (brighter below 1, darker above), for each gamma.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

from lineside.images import is_image_file, read_image
from lineside.runtime.drift import DriftMonitor, build_reference, check_reference, image_stats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("--frames", type=int, default=10_000)
    parser.add_argument("--gamma", default="0.7,1.4")
    parser.add_argument("--hold", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    paths = sorted(p for p in args.data.rglob("*") if p.is_file() and is_image_file(p))
    rng = np.random.default_rng(0)
    rng.shuffle(paths)
    images = np.stack([cv2.resize(read_image(p), (args.size, args.size), interpolation=cv2.INTER_AREA)
                       for p in paths[:900]])
    split = min(300, len(images) // 2)
    ref_images, stream = images[:split], images[split:]
    reference = check_reference(build_reference(ref_images, None, "bench"), "bench")
    b, c = image_stats(stream)
    report = {"data": str(args.data), "reference_images": len(ref_images), "stream_images": len(stream)}
    events = []
    monitor = DriftMonitor(reference, lambda k, d: events.append(k))
    order = np.repeat(rng.integers(0, len(stream), args.frames // args.hold + 1), args.hold)[:args.frames]
    for i in order:
        monitor.add(b[i], c[i], 0.9)
    report["unchanged"] = {"frames": args.frames, "alarms": events.count("drift"), "psi": monitor.psi, "z": monitor.z}
    for g in (float(x) for x in args.gamma.split(",")):
        gb, gc = image_stats(((stream / 255.0) ** g * 255).round().astype(np.uint8))
        events.clear()
        shifted = DriftMonitor(reference, lambda k, d: events.append(k))
        for i in order[:600]:
            shifted.add(b[i], c[i], 0.9)
        frames = None
        for k, i in enumerate(order[600:3600]):
            shifted.add(gb[i], gc[i], 0.9)
            if "drift" in events:
                frames = k + 1
                break
        report[f"gamma_{g:g}"] = {"frames_to_alarm": frames, "psi": shifted.psi, "z": shifted.z}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
