#!/usr/bin/env python
"""Throughput of a bundle's OpenVINO models with `benchmark_app`, back to back in one run.

FP32 is measured twice: pinned to f32 (what lineside runs for FP32) and with
OpenVINO's default precision, which is bfloat16 on CPUs that support it. Compare
the ratios, not the absolute numbers: on a shared 2-core machine they move by
10-15% between runs.

    python benchmarks/openvino_speed.py neu10-bundle --seconds 15
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from lineside.metadata import ModelMetadata


def throughput(xml: Path, shape: str, seconds: int, extra=()) -> float:
    exe = shutil.which("benchmark_app") or str(Path(sys.executable).with_name("benchmark_app"))
    cmd = [exe, "-m", str(xml), "-shape", shape, "-d", "CPU", "-hint", "throughput", "-t", str(seconds), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    found = re.search(r"Throughput:\s+([\d.]+) FPS", out.stdout)
    if out.returncode != 0 or not found:
        sys.exit(f"benchmark_app failed on {xml}:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return float(found.group(1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--seconds", type=int, default=15)
    args = ap.parse_args(argv)
    meta = ModelMetadata.from_dict(json.loads((args.bundle / "bundle.json").read_text())["metadata"])
    shape = f"{meta.input_name}[1,{meta.spec.height},{meta.spec.width},3]"
    rows = {"fp32 (f32)": throughput(args.bundle / "model_fp32.xml", shape, args.seconds, ["-infer_precision", "f32"]),
            "fp32 (OpenVINO default)": throughput(args.bundle / "model_fp32.xml", shape, args.seconds)}
    if (args.bundle / "model_int8.xml").is_file():
        rows["int8"] = throughput(args.bundle / "model_int8.xml", shape, args.seconds)
    base = rows["fp32 (f32)"]
    for name, fps in rows.items():
        print(f"{name:26s} {fps:8.1f} FPS  {fps / base:5.2f}x f32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
