"""Frozen forward passes over many images, as fast as the device allows.

Scoring a run (`lineside eval RUN`, `predict`), the studies' shared features and the
training bank all run a network that does not change over many images. On a CUDA
device that is PyTorch's job. On the CPU PyTorch runs Lite0 at about a third of
OpenVINO's speed (measured on NEU, 2 cores: 105 ms against 35 ms per image with four
test-time views), so there the same module is converted to OpenVINO in memory
(ov.convert_model; nothing written) and run at float32 precision: its outputs match
PyTorch's to about 1e-6 (tests/test_train.py checks 1e-4). Converting takes a few
seconds, so small jobs stay in PyTorch.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
import weakref
from typing import Callable

import numpy as np
import torch
from torch import nn

from .data import nchw, place

log = logging.getLogger(__name__)

# Below this many images (times views) of 224 x 224 px, proportionally more of smaller ones,
# conversion costs more than it saves. Measured break-even on a 2-core CPU (Lite0, one
# conversion of about 1.5 s): 82 images at 224 px, 254 at 128 px, about 700-1300 at 64 px.
MIN_OPENVINO_IMAGES = 192
TORCH_CPU_BATCH = 8      # PyTorch on the CPU: small batches stay in cache (1.7x faster than 32, measured)
TORCH_CUDA_BATCH = 64    # PyTorch on CUDA
# OpenVINO: one image per request, on a static one-image shape, twice as many requests as
# OpenVINO finds best (one is handed its next image while the others run). 480 images of
# 224 px through Lite0's single view on a 2-core CPU: 1.93-2.12 s against 2.57-2.76 s for
# batches of 8 on a dynamic batch shape, the same outputs to the last bit.
OPENVINO_BATCH = 1


@contextlib.contextmanager
def exact_fp32():
    """Float32 products in full float32 on CUDA. cuDNN's default on Ampere and later GPUs is
    TensorFloat-32 for convolutions (inputs rounded to 10 bits of mantissa), so a run would
    score differently on the GPU than on the CPU and than its exported model."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def fill_up(batch, whole, size: int):
    """The last, short batch of a job filled up to `size` with the job's first items, so
    that every batch has one shape (on CUDA each new shape costs cuDNN new kernels); the
    caller drops the extra rows. A job smaller than `size` stays as it is."""
    if len(batch) >= size or len(whole) < size:
        return batch
    cat = torch.cat if isinstance(batch, torch.Tensor) else np.concatenate
    return cat([batch, whole[:size - len(batch)]])


def _traced(module: nn.Module, example: torch.Tensor):
    """What ov.convert_model converts: OpenVINO's own TorchScript decoder of `module`, traced
    on `example` as convert_model(module, example_input=...) traces it, but without
    torch.jit.trace's check of the trace (check_trace), which runs the network twice more
    and imports torch.distributed.tensor for its comparison: 2.2-2.6 s against 1.5 s for
    Lite0's single view at 224 px on a 2-core CPU, the same compiled outputs to the last
    bit. Where OpenVINO has no such decoder, the module itself (convert_model traces it)."""
    try:
        from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder
    except ImportError:
        return module
    try:
        return TorchScriptPythonDecoder(module, example_input=example, trace_kwargs={"check_trace": False})
    except TypeError:     # a decoder without trace_kwargs
        return module


class UInt8Input(nn.Module):
    """(N, H, W, 3) uint8 RGB -> fn(N, 3, H, W float 0..255): the one input every caller has.
    `owner`, the module whose weights fn uses, is a submodule, so that tracing finds them."""

    def __init__(self, owner: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.owner = owner
        self.fn = fn

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.fn(nchw(image))


def backend_for(device: torch.device, n_images: int, shape=(224, 224)) -> str:
    """"openvino" or "torch" for a job of n_images of `shape` (H, W) on `device`
    (LINESIDE_FAST_INFERENCE=torch keeps every job in PyTorch)."""
    if os.environ.get("LINESIDE_FAST_INFERENCE", "").lower() == "torch":
        return "torch"
    work = n_images * shape[0] * shape[1] / (224 * 224)
    if torch.device(device).type != "cpu" or work < MIN_OPENVINO_IMAGES:
        return "torch"
    try:
        import openvino  # noqa: F401 - part of the base install; absent only in odd environments
    except ImportError:
        return "torch"
    return "openvino"


class FrozenForward:
    """`fn` (a function of a float NCHW batch, a method of `owner`) over uint8 NHWC
    batches: call it with a numpy batch, get a CPU tensor back. `owner` is the module whose
    weights fn uses; it is put in eval mode and must not change while this object is used.
    `backend` "torch" keeps the job in PyTorch whatever its size (default: backend_for)."""

    def __init__(self, owner: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], example: np.ndarray,
                 device: torch.device, n_images: int, backend: str | None = None):
        self.device = torch.device(device)
        self.owner = owner.eval()
        self.module = UInt8Input(owner, fn).eval()
        self.backend = backend or backend_for(self.device, n_images, example.shape[1:3])
        if self.backend == "openvino":
            try:
                self._compiled = self._convert(example)
            except Exception as exc:  # noqa: BLE001 - any conversion failure: PyTorch still works
                log.warning("OpenVINO could not convert the network (%s); scoring in PyTorch", exc)
                self.backend = "torch"
        if self.backend == "openvino":
            self.owner = self.module = None      # the compiled model holds its own weights
        elif self.device.type == "cpu":
            place(self.owner, self.device)

    @property
    def batch_size(self) -> int:
        return OPENVINO_BATCH if self.backend == "openvino" else (TORCH_CPU_BATCH if self.device.type == "cpu"
                                                                  else TORCH_CUDA_BATCH)

    def _convert(self, example: np.ndarray):
        import openvino as ov

        grads = [(p, p.requires_grad) for p in self.owner.parameters()]
        try:
            for p, _ in grads:
                p.requires_grad_(False)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")    # the tracer's notes on shapes it records as constants
                model = ov.convert_model(_traced(self.module, torch.from_numpy(np.ascontiguousarray(example[:1]))))
        finally:
            for p, flag in grads:
                p.requires_grad_(flag)
        model.reshape({model.inputs[0]: [OPENVINO_BATCH, *example.shape[1:]]})     # static: faster kernels
        core = ov.Core()
        return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "THROUGHPUT"})

    def __call__(self, batch: np.ndarray) -> torch.Tensor:
        if self.backend == "openvino":
            return self.map(batch)
        with torch.inference_mode(), exact_fp32():
            t = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, non_blocking=True)
            return self.module(t)

    def map(self, x: np.ndarray, progress=None) -> torch.Tensor:
        """The outputs for every image of x, in order, on the CPU. OpenVINO runs several
        images at once (its throughput mode: one stream per core or two)."""
        bs = self.batch_size
        starts = range(0, len(x), bs)
        if self.backend == "openvino":
            # Requests of our own, waited on in this thread (runtime.model.stream): with
            # AsyncInferQueue's callback, releasing the compiled model could hang for ever: its
            # destructor (holding the GIL) joined a stream thread that was waiting for the GIL
            # to finish a callback.
            from lineside.runtime.model import OpenVINOEngine, stream

            n = 2 * max(1, int(self._compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
            engine = OpenVINOEngine(self._compiled, max(1, min(n, len(x))))
            return torch.from_numpy(stream(engine, x, tuple(self._compiled.outputs[0].shape)[1:], progress))
        out = []
        for s in starts:
            batch = x[s:s + bs]
            out.append(self(fill_up(batch, x, bs))[:len(batch)])   # read back once, at the end: no wait per batch
            if progress is not None:
                progress(len(batch))
        return torch.cat(out).cpu()


# The last OpenVINO conversion (frozen_forward): (a weak reference to its module, (key, input
# shape, device), a digest of the tensors it read, the FrozenForward).
_last_conversion: list = [None]


def weights_digest(tensors) -> bytes:
    """A digest of the values of `tensors` (the weights and statistics a conversion read).
    Values, not PyTorch's in-place version counters: those miss BatchNorm's running
    statistics updated by a forward pass and writes through `.data`. About 15 ms for Lite0."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        h.update(t.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy())
    return h.digest()


def frozen_forward(owner: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], key: str, example: np.ndarray,
                   device: torch.device, n_images: int, depends=None) -> FrozenForward:
    """FrozenForward(owner, fn, ...), reusing the last OpenVINO conversion when it was of the
    same function (`key`) of the same module for the same input size, and the tensors fn
    depends on (`depends`; by default every parameter and buffer of owner) hold the same
    values. A run of the linear recipe converts its network once, for the bank of
    features, and scores with the same conversion. Only one conversion is kept."""
    where = (key, tuple(example.shape[1:]), torch.device(device).type)
    last = _last_conversion[0]
    kept = last is not None and last[0]() is owner and last[1] == where
    if not kept and backend_for(device, n_images, example.shape[1:3]) != "openvino":
        return FrozenForward(owner, fn, example, device, n_images)
    digest = weights_digest(depends if depends is not None else [*owner.parameters(), *owner.buffers()])
    if kept and last[2] == digest:
        owner.eval()
        return last[3]
    run = FrozenForward(owner, fn, example, device, n_images)
    if run.backend == "openvino":
        _last_conversion[0] = (weakref.ref(owner), where, digest, run)
    return run


def embed_tensors(model) -> list[torch.Tensor]:
    """What a Classifier's `embed` reads: the normalisation and the backbone."""
    return [model.mean, model.std, *model.backbone.parameters(), *model.backbone.buffers()]
