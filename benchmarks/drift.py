#!/usr/bin/env python
"""Drift alarms on a real dataset: no alarm over unchanged streams, and how soon one comes
after the light changes, against the size of the change in training standard deviations.

    python benchmarks/drift.py ../shared/datasets/neu-det
    python benchmarks/drift.py elpv --gamma 0.7,0.8,1.25,1.4 --splits 3 --draws 15

Up to 900 images are read at the model's input size (224 px). For each of --splits
random splits, a reference is built as export builds it (runtime.drift.build_reference)
from up to 300 of them; the stream draws the others, each held --hold frames, through a
DriftMonitor with the run's defaults (window 300, every 30). Reported per split: alarms
over --frames unchanged frames in each of --unchanged-draws draws (and the largest shift
of the window's mean seen there, in training SD, and the largest PSI), then, for each gamma (brighter below 1,
darker above) given to every image after 600 unchanged frames, the shift it makes in
training SD and the frames until the alarm in each of --draws draws (None: no alarm in
3,000 frames). The summary counts the alarms later than the documented bound (one window
and two evaluations) among shifts of at least BOUND_SD.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import open_benchmark_data  # noqa: E402

from lineside.images import read_image  # noqa: E402
from lineside.runtime.drift import (  # noqa: E402
    BOUND_SD, DEFAULT_EVERY, DEFAULT_WINDOW, DriftMonitor, build_reference, check_reference, image_stats,
)


def _images(name: str, size: int) -> np.ndarray:
    paths = list(open_benchmark_data(name if name == "elpv" else Path(name)).paths)
    np.random.default_rng(0).shuffle(paths)
    return np.stack([cv2.resize(read_image(p), (size, size), interpolation=cv2.INTER_AREA) for p in paths[:900]])


def _stream(n: int, frames: int, hold: int, seed: int) -> np.ndarray:
    return np.repeat(np.random.default_rng(seed).integers(0, n, frames // hold + 1), hold)[:frames]


def _unchanged(reference, stats, order) -> tuple[int, float, float]:
    events, zmax, psimax = [], 0.0, 0.0
    monitor = DriftMonitor(reference, lambda k, d: events.append(k))
    for i in order:
        monitor.add(stats[0][i], stats[1][i], 0.9)
        if monitor.frames >= monitor.window and monitor.frames % monitor.every == 0:
            zmax, psimax = max(zmax, *monitor.z.values()), max(psimax, *monitor.psi.values())
    return events.count("drift"), zmax, psimax


def _frames_to_alarm(reference, stats, shifted, order) -> int | None:
    events = []
    monitor = DriftMonitor(reference, lambda k, d: events.append(k))
    for i in order[:600]:
        monitor.add(stats[0][i], stats[1][i], 0.9)
    events.clear()
    for k, i in enumerate(order[600:3600]):
        monitor.add(shifted[0][i], shifted[1][i], 0.9)
        if "drift" in events:
            return k + 1
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="a dataset folder, or elpv")
    parser.add_argument("--frames", type=int, default=10_000, help="frames of each unchanged stream")
    parser.add_argument("--gamma", default="0.7,0.8,1.25,1.4")
    parser.add_argument("--splits", type=int, default=3, help="reference/stream splits")
    parser.add_argument("--draws", type=int, default=15, help="streams per gamma and split")
    parser.add_argument("--unchanged-draws", type=int, default=5, help="unchanged streams per split")
    parser.add_argument("--hold", type=int, default=3, help="frames each part is held")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    images = _images(args.data, args.size)
    bound = DEFAULT_WINDOW + 2 * DEFAULT_EVERY
    report = {"data": args.data, "images": len(images), "bound_frames": bound, "bound_sd": BOUND_SD, "splits": []}
    late = big = 0
    for split in range(args.splits):
        order = np.random.default_rng(100 + split).permutation(len(images))
        cut = min(300, len(images) // 2)
        reference = check_reference(build_reference(images[order[:cut]], None, "bench"), "bench")
        stream = images[order[cut:]]
        stats = image_stats(stream)
        runs = [_unchanged(reference, stats, _stream(len(stream), args.frames, args.hold, s))
                for s in range(args.unchanged_draws)]
        row = {"reference_images": cut, "unchanged_alarms": sum(r[0] for r in runs),
               "unchanged_max_shift_sd": round(max(r[1] for r in runs), 3),
               "unchanged_max_psi": round(max(r[2] for r in runs), 3), "gamma": {}}
        for g in (float(x) for x in args.gamma.split(",")):
            shifted = image_stats(((stream / 255.0) ** g * 255).round().astype(np.uint8))
            shift = max(abs(shifted[j].mean() - reference[name]["mean"]) / reference[name]["sd"]
                        for j, name in enumerate(("brightness", "contrast")))
            frames = [_frames_to_alarm(reference, stats, shifted, _stream(len(stream), 3600, args.hold, s))
                      for s in range(args.draws)]
            if shift >= BOUND_SD:
                big += len(frames)
                late += sum(f is None or f > bound for f in frames)
            row["gamma"][f"{g:g}"] = {"shift_sd": round(float(shift), 2), "frames_to_alarm": frames}
        report["splits"].append(row)
        print(f"split {split}: {json.dumps(row)}", file=sys.stderr, flush=True)
    report["summary"] = {"unchanged_alarms": sum(r["unchanged_alarms"] for r in report["splits"]),
                         f"streams_shifted_at_least_{BOUND_SD}_sd": big, "of_them_later_than_bound": late}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
