"""Data-parallel training on several GPUs (or CPU processes) with PyTorch's
DistributedDataParallel, started by torchrun.

One machine: `lineside train DATA --out RUN --gpus N` starts N processes through
torchrun (`python -m torch.distributed.run --standalone --nproc-per-node N -m
lineside.cli train DATA --out RUN ...`). Several machines: start torchrun on each,

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        -m lineside.cli train DATA --out RUN --strategy full

Each process reads the data, takes its share of every epoch's shuffled images (a
distributed sampler: the shared order padded to a multiple of the processes, every
N-th image), and DistributedDataParallel averages the gradients. Only rank 0 writes
the run folder and prints; training losses are averaged across ranks, and rank 0's
validation decides early stopping for all. With CUDA the backend is NCCL, one GPU per
process; without, gloo on CPU processes, which is how the tests run the same code.

The recipes that train end to end (full, scratch, and finetune with --unfreeze all)
are data-parallel. The frozen-feature recipes (linear heads, the view bank of
finetune) take seconds and run whole in every process, rank 0 writing the result.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from lineside.errors import LinesideError

from .device import pick_device


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    """The process's place in a torchrun job (a single process without one)."""
    try:
        return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as exc:
        raise LinesideError(f"RANK/WORLD_SIZE/LOCAL_RANK: not integers ({exc})") from None


def setup(dist: Dist, device: str) -> torch.device | None:
    """Join the job's process group; the device this process trains on (None: not distributed)."""
    if not dist.active:
        return None
    import torch.distributed as td

    cuda = pick_device(device).type == "cuda"
    if not td.is_initialized():
        td.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(dist.local_rank)
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def teardown(dist: Dist):
    if dist.active:
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()


def shard(order: np.ndarray, dist: Dist) -> np.ndarray:
    """This rank's share of an epoch's order (the same on every rank): padded with its
    first images to a multiple of the ranks, then every world-th one, so that every rank
    takes the same number of batches (DistributedSampler's rule)."""
    if not dist.active:
        return order
    pad = (-len(order)) % dist.world
    if pad:
        order = np.concatenate([order, np.resize(order, pad)])
    return order[dist.rank::dist.world]


def mean(value: float, dist: Dist, device: torch.device) -> float:
    """The mean of a number over the ranks (one collective)."""
    if not dist.active:
        return value
    import torch.distributed as td

    t = torch.tensor([value], dtype=torch.float64, device=device)
    td.all_reduce(t)
    return float(t) / dist.world


def from_main(values: list[float], dist: Dist, device: torch.device) -> list[float]:
    """Rank 0's numbers on every rank (so that every rank takes rank 0's decisions)."""
    if not dist.active or not values:
        return values
    import torch.distributed as td

    t = torch.tensor(values, dtype=torch.float64, device=device)
    td.broadcast(t, 0)
    return [float(v) for v in t]


def wrap(model: torch.nn.Module, dist: Dist, device: torch.device):
    """The model as the training forward: DistributedDataParallel when distributed."""
    if not dist.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def torchrun_args(processes: int, argv: list[str], log_dir: str | None = None) -> list[str]:
    """The command that runs `lineside <argv>` in `processes` processes on this machine;
    torchrun's own folders in `log_dir` (without it torchrun leaves a torchelastic_* folder
    in the temporary folder after every run)."""
    logs = [f"--log-dir={log_dir}"] if log_dir else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *logs,
            "-m", "lineside.cli", *argv]


def without_option(argv: list[str], name: str) -> list[str]:
    """argv without `name VALUE` / `name=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == name:
            skip = True
            continue
        if arg.startswith(name + "="):
            continue
        out.append(arg)
    return out
