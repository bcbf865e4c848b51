"""Datasets for the benchmarks: a folder (or manifest) as lineside reads it, or `elpv`,
the solar-cell electroluminescence images that the `elpv-dataset` package ships.

elpv's licence (CC BY-NC-SA) allows benchmarks, not redistribution: the images are
written once as PNG files to a cache folder outside the repository
(~/.cache/lineside-benchmarks/elpv, or $LINESIDE_BENCH_CACHE), never into it. Cells with
defect probability 0 are `functional`, 1 `defective`; the uncertain ones (1/3, 2/3)
are left out.
"""

from __future__ import annotations

import os
from pathlib import Path

from lineside.dataset import ImageSet, load_image_set


def open_benchmark_data(name: str | Path) -> ImageSet:
    if str(name) == "elpv":
        return load_image_set(_elpv_folder())
    return load_image_set(name)


def _elpv_folder() -> Path:
    import cv2

    root = Path(os.environ.get("LINESIDE_BENCH_CACHE", Path.home() / ".cache" / "lineside-benchmarks")) / "elpv"
    done = root / ".complete"
    if done.exists():
        return root
    try:
        from elpv_dataset.utils import load_dataset
    except ImportError:
        raise SystemExit("elpv: pip install elpv-dataset (the images ship in that package)")
    images, proba, _ = load_dataset()
    for i, (im, p) in enumerate(zip(images, proba)):
        label = {0.0: "functional", 1.0: "defective"}.get(float(p))
        if label is None:
            continue
        (root / label).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / label / f"cell_{i:04d}.png"), im)
    done.touch()
    return root
