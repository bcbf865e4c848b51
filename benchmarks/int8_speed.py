#!/usr/bin/env python
"""Throughput of exported models, FP32 against INT8, in interleaved rounds on this host.

Each argument is a model file (.xml runs on OpenVINO, .onnx on ONNX Runtime); each round
times every model for --seconds with several requests in flight (lineside's own
throughput measurement, as `lineside export --speed-seconds` reports it), and the ratio
of each INT8 model to the FP32 model of the same runtime (the first model of that runtime
given) is printed from the mean of the rounds.

    python benchmarks/int8_speed.py B/model_fp32.xml B/model_int8.xml B/model_fp32.onnx B/model_int8.onnx
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lineside.runtime.bench import raw_fps
from lineside.runtime.model import open_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)

    runs: dict[Path, list[float]] = {p: [] for p in args.models}
    for _ in range(args.rounds):
        for path in args.models:
            backend = "openvino" if path.suffix == ".xml" else "onnxruntime"
            model = open_model(path, backend=backend, precision="int8" if "int8" in path.name else "fp32")
            runs[path].append(raw_fps(model, args.seconds, "throughput"))
    first: dict[str, float] = {}
    for path, fps in runs.items():
        mean = sum(fps) / len(fps)
        first.setdefault(path.suffix, mean)
        print(f"{path}: {' / '.join(f'{x:.1f}' for x in fps)} FPS, {mean / first[path.suffix]:.2f}x the first "
              f"{path.suffix} model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
