#!/usr/bin/env python
"""What the test-time views buy: each run kept by `benchmarks/int8_gate.py --keep DIR`
(run_K_S with train_K_S.csv and rest_K_S.csv beside it) is exported to FP32 twice, with its
views (the default) and with one pass (`lineside export RUN --tta off`), and both are scored
with OpenVINO on every image not drawn; the seconds each took to score them are beside.

    python benchmarks/int8_gate.py ../shared/datasets/neu-det --shots 10 --repeats 3 --keep /tmp/k/neu
    python benchmarks/views_worth.py /tmp/k/neu
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    from lineside.dataset import load_arrays, load_image_set
    from lineside.export.bundle import export_bundle
    from lineside.metrics import classification_report
    from lineside.runtime.model import open_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("keep", type=Path, help="a folder written by benchmarks/int8_gate.py --keep")
    args = ap.parse_args(argv)
    rows = []
    for run in sorted(args.keep.glob("run_*_*")):
        k, seed = run.name.split("_")[1:]
        rest = load_image_set(args.keep / f"rest_{k}_{seed}.csv")
        row = {"run": run.name}
        with tempfile.TemporaryDirectory() as tmp:
            for tta in (True, False):
                out = Path(tmp) / f"b{int(tta)}"
                export_bundle(run, out, formats=["openvino"], int8=False, tta=tta)
                model = open_model(out, backend="openvino")
                x, kept, _ = load_arrays(rest, model.spec, progress=False)
                t0 = time.perf_counter()
                p = model.predict_proba(x)
                seconds = time.perf_counter() - t0
                bal = classification_report(np.asarray(kept.targets), p.argmax(1), list(model.labels))
                key = "views" if tta else "one_pass"
                row[key] = round(100 * bal["balanced_accuracy"], 3)
                row[f"{key}_images_per_s"] = round(len(x) / seconds, 1)
        row["views_gain_points"] = round(row["views"] - row["one_pass"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if rows:
        gains = [r["views_gain_points"] for r in rows]
        print(f"views gain: mean {np.mean(gains):+.2f} points (min {min(gains):+.2f}, max {max(gains):+.2f}) "
              f"over {len(rows)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
