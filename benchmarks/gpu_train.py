#!/usr/bin/env python
"""Training speed against the GPU's ceiling, in one run on one device.

For each batch size it measures
- the reference: a plain loop with lineside's own Classifier (Lite0, ImageNet weights),
  the images already on the device as uint8, random flips on the device, AMP (bf16 where
  supported), channels_last and AdamW: what the device can do with this network;
- `lineside train DATA --strategy full` and `--strategy finetune --unfreeze all` on the
  same images: steady-state images per second (epochs after the first, from
  history.csv: the training steps alone, and with the epoch's validation), the first
  epoch's time against a later one's, and the whole command's time;
and prints the ratio of lineside's steady state to the reference, the first step's
time (where cuDNN sets up its kernels) and where the rest of the command's time went.
With --layouts channels_last,nchw the reference loop and `--strategy full` also run
in NCHW (LINESIDE_CHANNELS_LAST=0; train/data.py says why that can matter). With
--gpus 1,2,4 it also trains `--strategy full --gpus N` (data-parallel, torchrun) at the
first batch size (per process) and prints each N's steady-state images per second
against N times one process's: the scaling figure for a machine with several GPUs
(without CUDA, N CPU processes on gloo: the same code path, not a speed figure). With
--ablate the reference loop also runs with `--strategy full`'s recipe choices added
(VARIANTS: frozen BatchNorm statistics, the batch augmentation, and all of them), which
splits a gap to lineside into what the recipe itself costs and what its loop adds, and
through torch.compile at the first batch size: its first step is the compilation,
against which the steady state's gain is weighed (lineside trains eagerly).

    python benchmarks/gpu_train.py ../shared/datasets/neu-det --batch-sizes 32,128 --epochs 5
    python benchmarks/gpu_train.py ../shared/datasets/neu-det --layouts channels_last,nchw --json gpu.json
    python benchmarks/gpu_train.py ../shared/datasets/neu-det --device cpu --limit 60 --image-size 64 --epochs 2
    python benchmarks/gpu_train.py ../shared/datasets/neu-det --batch-sizes 128 --gpus 1,2,4
    python benchmarks/gpu_train.py ../shared/datasets/neu-det --ablate --seconds 5
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lineside.dataset import load_arrays, load_image_set
from lineside.train.backbones import BACKBONES, build_backbone
from lineside.train.augment import AugmentConfig, BatchAugmenter
from lineside.train.config import TrainConfig
from lineside.train.loop import amp_dtype, optimizer, set_train_mode
from lineside.train.model import Classifier


# the reference loop's memory layouts, and the LINESIDE_CHANNELS_LAST that gives lineside each
LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
LAYOUT_ENV = {"channels_last": "1", "nchw": "0"}


# The reference loop with one or more of `lineside train --strategy full`'s choices
# (--ablate): where a gap between the two comes from, the recipe's own work or lineside's loop.
VARIANTS = {
    "plain": set(),
    "frozen BN": {"frozen_bn"},                 # pretrained BatchNorm statistics kept (--bn-stats freeze)
    "batch augment": {"augment"},               # BatchAugmenter's full draw instead of flips
    "recipe": {"frozen_bn", "augment", "optim"},  # both, with label smoothing and lineside's AdamW groups
    "compiled": {"compile"},                    # the plain loop through torch.compile: its first step compiles
}


def reference_rate(x: np.ndarray, y: np.ndarray, classes: int, spec, batch: int, device: torch.device,
                   seconds: float, layout: str = "channels_last", variant: str = "plain") -> tuple[float, float]:
    """Images per second of the plain loop after two warm-up steps, and the first step's
    seconds (cuDNN setting up its kernels for a shape and layout this process has not run).
    `variant` (VARIANTS) adds lineside's recipe choices to the loop, one at a time or all."""
    fmt, parts = LAYOUTS[layout], VARIANTS[variant]
    entry, backbone = build_backbone("efficientnet_lite0", "imagenet")
    model = Classifier(backbone, entry.feature_dim, classes, spec).to(device).to(memory_format=fmt)
    if "frozen_bn" in parts:
        set_train_mode(model, 0, freeze_bn=True)
    else:
        model.train()
    net = torch.compile(model) if "compile" in parts else model
    if "optim" in parts:
        cfg = TrainConfig()
        opt = optimizer([{"params": list(model.backbone.parameters()), "lr": cfg.lr / 10},
                         {"params": list(model.head.parameters()), "lr": cfg.lr}], cfg.weight_decay, device)
        smoothing = cfg.label_smoothing
    else:
        opt, smoothing = torch.optim.AdamW(model.parameters(), lr=1e-4), 0.0
    augment = BatchAugmenter(AugmentConfig(), spec.height == spec.width) if "augment" in parts else None
    images = torch.from_numpy(x).to(device)
    targets = torch.from_numpy(y).to(device)
    amp = device.type == "cuda"
    dtype = amp_dtype(device) if amp else torch.float16     # as lineside's training picks it

    def step():
        idx = torch.randint(0, len(images), (batch,), device=device)
        xb = images[idx].permute(0, 3, 1, 2).float()
        if augment is not None:
            xb = augment(xb).contiguous(memory_format=fmt)
        else:
            flip = torch.rand(batch, device=device) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb).contiguous(memory_format=fmt)
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = F.cross_entropy(net(xb), targets[idx], label_smoothing=smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    step()
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += batch
    sync()
    return n / (time.perf_counter() - t0), first


def lineside_rate(data: Path, strategy: list[str], batch: int, epochs: int, device: str, image_size: int | None,
                  work: Path, layout: str = "channels_last", processes: int = 1) -> dict:
    out = work / f"run-{'-'.join(strategy)}-{batch}-{layout}-{processes}"
    cmd = [sys.executable, "-m", "lineside.cli", "train", str(data), "--out", str(out), *strategy,
           "--batch-size", str(batch), "--epochs", str(epochs), "--device", device, "--val-fraction", "0.2",
           "--patience", str(epochs + 1), "--quiet", "--json", "--force"]
    if processes > 1:
        cmd += ["--gpus", str(processes)]
    if image_size:
        cmd += ["--image-size", str(image_size)]
    env = dict(os.environ, LINESIDE_CHANNELS_LAST=LAYOUT_ENV[layout])
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    total = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"lineside train failed:\n{done.stderr[-2000:]}")
    metrics = json.loads(done.stdout[done.stdout.index("{"):])     # torchrun may print a note first
    n_train = sum(metrics["train_counts"].values())
    with open(out / "history.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["stage"] != "head"]
    seconds = [float(r["seconds"]) for r in rows]
    training = [float(r.get("train_seconds") or r["seconds"]) for r in rows]
    steady = float(np.median(seconds[1:])) if len(seconds) > 1 else float("nan")
    steady_train = float(np.median(training[1:])) if len(training) > 1 else float("nan")
    first_step = [float(r.get("first_step_seconds") or "nan") for r in rows]
    # where the command's time went: in the process (metrics.json "seconds") and before it (start, imports)
    parts = {k: v for k, v in metrics["seconds"].items() if k != "total"}
    parts["start_s"] = total - metrics["seconds"]["total"] - parts.get("score_s", 0) - parts.get("write_s", 0)
    parts["epochs_s"] = sum(seconds)
    return {"command_s": round(total, 1), "first_epoch_s": round(seconds[0], 2), "steady_epoch_s": round(steady, 2),
            "first_step_s": round(first_step[0], 2), "later_first_step_s": round(float(np.median(first_step[1:])), 3)
            if len(first_step) > 1 else float("nan"),
            "img_per_s": round(n_train / steady, 1), "train_img_per_s": round(n_train / steady_train, 1),
            "train_images": n_train, "device": metrics["device"], "parts": {k: round(v, 2) for k, v in parts.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--batch-sizes", default="32,128")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--limit", type=int, default=None, help="Use only the first N images (a quick check).")
    ap.add_argument("--seconds", type=float, default=10.0, help="Seconds of the reference loop per batch size.")
    ap.add_argument("--layouts", default="channels_last",
                    help="Memory layouts to measure, of channels_last,nchw: the reference loop and "
                         "--strategy full in each (lineside through LINESIDE_CHANNELS_LAST).")
    ap.add_argument("--gpus", default=None,
                    help="Process counts for data-parallel scaling, e.g. 1,2,4: `--strategy full --gpus N` at the "
                         "first batch size, against N times one process.")
    ap.add_argument("--ablate", action="store_true",
                    help="Also run the reference loop with lineside's recipe choices added (frozen BatchNorm "
                         "statistics, the batch augmentation, both with label smoothing and lineside's AdamW), "
                         "in the first layout: what the recipe costs, apart from lineside's loop; and the plain "
                         "loop through torch.compile at the first batch size (its first step is the "
                         "compilation).")
    ap.add_argument("--json", type=Path, default=None, help="Also write every figure to this JSON file.")
    args = ap.parse_args()

    device = torch.device(args.device)
    importlib.import_module("torch._dynamo")   # AdamW's first step would, inside the reference's first step
    images = load_image_set(args.data)
    if args.limit:
        images = images.subset(np.random.default_rng(0).permutation(len(images))[:args.limit])
    spec = BACKBONES.get("efficientnet_lite0").input_spec.with_size(args.image_size)
    x, images, _ = load_arrays(images, spec, progress=False)
    y = np.asarray(images.targets, dtype=np.int64)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{len(y)} images at {spec.width} px on {gpu}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="lineside-gpu-train-") as tmp:
        tmp = Path(tmp)
        data = tmp / "data.csv"
        images.write_manifest(data)
        layouts = [lay.strip() for lay in args.layouts.split(",")]
        if any(lay not in LAYOUTS for lay in layouts):
            raise SystemExit(f"--layouts {args.layouts}: each one of {', '.join(LAYOUTS)}")
        figures, ablation, scaling = [], [], []

        def save():
            """Every figure so far to --json: a run cut off by a time limit keeps what it measured."""
            if args.json:
                args.json.write_text(json.dumps({"device": gpu, "torch": torch.__version__, "images": len(y),
                                                 "size": spec.width, "figures": figures, "ablation": ablation,
                                                 "scaling": scaling}, indent=2))
        batches = [int(b) for b in args.batch_sizes.split(",")]
        for batch in batches:
            for layout in layouts:
                ref, first = reference_rate(x, y, len(images.classes), spec, batch, device, args.seconds, layout)
                print(f"batch {batch}, {layout}: reference loop {ref:.0f} img/s (its first step {first:.2f} s)",
                      flush=True)
                if args.ablate and layout == layouts[0]:
                    for variant in list(VARIANTS)[1:]:
                        if variant == "compiled" and batch != batches[0]:
                            continue        # a minute of compiling per shape: at the first batch size alone
                        r, f = reference_rate(x, y, len(images.classes), spec, batch, device, args.seconds, layout,
                                              variant)
                        ablation.append({"batch": batch, "layout": layout, "variant": variant, "img_per_s": r,
                                         "first_step_s": f, "of_plain": round(r / ref, 3)})
                        save()
                        print(f"  reference + {variant:13s}: {r:.0f} img/s ({r / ref:.2f}x the plain loop; "
                              f"first step {f:.2f} s)", flush=True)
                runs = [("full", ["--strategy", "full"])]
                if layout == layouts[0]:
                    runs.append(("finetune all", ["--strategy", "finetune", "--unfreeze", "all"]))
                for name, strategy in runs:
                    r = lineside_rate(data, strategy, batch, args.epochs, args.device, args.image_size, tmp, layout)
                    figures.append({"batch": batch, "layout": layout, "recipe": name, "reference_img_per_s": ref,
                                    "reference_first_step_s": first, **r})
                    save()
                    print(f"  lineside {name:13s}: steady state {r['train_img_per_s']:.0f} img/s training "
                          f"({r['train_img_per_s'] / ref:.2f}x the reference), {r['img_per_s']:.0f} img/s with "
                          f"the epoch's validation ({r['img_per_s'] / ref:.2f}x); first epoch {r['first_epoch_s']} s "
                          f"({r['first_epoch_s'] / r['steady_epoch_s']:.1f}x a later one, {r['steady_epoch_s']} s; "
                          f"its first step {r['first_step_s']} s); whole command {r['command_s']} s", flush=True)
                    print("    " + ", ".join(f"{k} {v}" for k, v in r["parts"].items()), flush=True)
        if args.gpus:
            counts = sorted({int(n) for n in args.gpus.split(",")} | {1})
            present = torch.cuda.device_count() if device.type == "cuda" else None
            if present is not None and counts[-1] > present:
                raise SystemExit(f"--gpus {args.gpus}: this machine has {present} CUDA device(s)")
            batch = int(args.batch_sizes.split(",")[0])
            for n in counts:
                r = lineside_rate(data, ["--strategy", "full"], batch, args.epochs, args.device, args.image_size,
                                  tmp, processes=n)
                one = scaling[0]["train_img_per_s"] if scaling else r["train_img_per_s"]
                scaling.append({"processes": n, "batch_per_process": batch, **r,
                                "speedup": round(r["train_img_per_s"] / one, 2)})
                save()
                target = f" (target {0.8 * n:.1f}x)" if n > 1 else ""
                print(f"--gpus {n}: steady state {r['train_img_per_s']:.0f} img/s training, "
                      f"{scaling[-1]['speedup']:.2f}x one process{target}; whole command {r['command_s']} s", flush=True)
        save()


if __name__ == "__main__":
    main()
