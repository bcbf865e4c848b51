"""A CUDA device that is not there, for the tests on a machine without a GPU
(tests/test_stand_in_cuda.py runs this file in a fresh process per job):

    python tests/stand_in_cuda.py refuse
    python tests/stand_in_cuda.py train DATA OUT '{"strategy": "full", ...}'   # TrainConfig options
    STAND_IN_MUTANT=labels-on-host python tests/stand_in_cuda.py train ...   # a mistake it must catch
    python tests/stand_in_cuda.py steps DATA OUT '{...}'   # what makes the host wait, step by step
    python tests/stand_in_cuda.py kernels DATA OUT '{...}'   # the convolution shapes each phase brings
    python tests/stand_in_cuda.py eval RUN DATA
    python tests/stand_in_cuda.py study sample-size|compare|cv DATA OUT

PyTorch's FakeTensorMode makes tensors that carry a device, a shape and a dtype but no
data, and refuses, as CUDA does, an operation that mixes tensors of two devices. With
lineside's device "cuda" made such a device, a CPU tensor meeting the model's weights (the
crash of the default `lineside train` on a GPU) fails on a machine without a GPU, at the
line that made it. What the stand-in cannot do, it stands in for: reading a value
(float(), .item(), bool()) gives a dummy number, while numpy() and tolist() of a tensor
off the CPU fail, as on CUDA; the backward pass is skipped (PyTorch's autograd engine
needs a real CUDA context), so no weight changes; pinned memory is ordinary memory;
torch.save checks that everything it would write is on the CPU. The figures of such a
run mean nothing: this checks where tensors live, not what they hold. It runs in a process
of its own because it patches torch for the whole process.

Prints one JSON line; on an error, the error and lineside's frames of its traceback,
and exits with 1.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import types
from pathlib import Path

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

CUDA = torch.device("cuda")
NUMPY = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
         torch.bfloat16: np.float32, torch.int64: np.int64, torch.int32: np.int32, torch.uint8: np.uint8,
         torch.bool: np.bool_}


# What makes the host wait for a GPU, as it happens: (what, where in lineside).
WAITS: list[tuple[str, str]] = []


def _wait(what: str) -> None:
    frames = [f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno}"
              for f in traceback.extract_stack()[:-2] if "site-packages" not in f.filename
              and "stand_in_cuda" not in f.filename]
    WAITS.append((what, frames[-1] if frames else "?"))


def _values(name, real):
    """Tensor.`name` giving a stand-in value for a FakeTensor; numpy() and tolist() of one
    off the CPU fail, as they do for a CUDA tensor. Reading a value on the device is a wait."""
    def read(self, *args, **kwargs):
        if not isinstance(self, FakeTensor):
            return real(self, *args, **kwargs)
        if self.device.type != "cpu":
            _wait(f"{name}()")
        if name in ("numpy", "tolist") and self.device.type != "cpu":
            raise TypeError(f"can't convert {self.device} tensor to numpy: use .cpu() first ({name})")
        if name == "numpy":
            return np.full(tuple(self.shape), 0.5 if self.is_floating_point() else 0, NUMPY[self.dtype])
        if name == "tolist":
            return np.zeros(tuple(self.shape), int).tolist()
        if name == "__bool__":
            return True           # ends an optimiser's convergence test (L-BFGS) at once
        if name in ("__int__", "__index__"):
            return 0
        if name == "__float__":
            return 0.5
        return 0.5 if self.is_floating_point() else 0     # item()
    return read


def to_device(module: torch.nn.Module, device) -> torch.nn.Module:
    """data.place for the stand-in (Module.to() cannot swap a FakeTensor parameter): every
    weight and buffer on `device`, 4-d weights in the layout memory_format() says."""
    from lineside.train.data import memory_format

    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                q = p.detach().to(device)
                q = q.contiguous(memory_format=memory_format(device)) if q.dim() == 4 else q
                m._parameters[name] = torch.nn.Parameter(q, requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = b.to(device)
    return module


def _save_checked(obj, path, *args, **kwargs):
    """torch.save for the stand-in: everything it would write must be on the CPU."""
    def walk(o, where):
        if isinstance(o, torch.Tensor):
            if o.device.type != "cpu":
                raise AssertionError(f"torch.save of a tensor on {o.device} at {where}")
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{where}/{k}")
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{where}/{i}")
    walk(obj, "")
    Path(path).write_bytes(b"stand-in")


def _pin(self, *args, **kwargs):
    """pin_memory() for the stand-in: the tensor itself, marked as pinned (is_pinned)."""
    self._stand_in_pinned = True
    return self


def stand_in() -> FakeTensorMode:
    """Patch this process so that lineside's "cuda" is the stand-in; enter the returned mode."""
    from lineside.train import data, evaluate, trainer

    props = types.SimpleNamespace(major=9, minor=0, total_memory=80 << 30, name="stand-in")
    torch.cuda.get_device_properties = lambda device=None: props
    torch.cuda.mem_get_info = lambda device=None: (70 << 30, 80 << 30)
    torch.cuda.synchronize = lambda device=None: _wait("synchronize")
    torch.Tensor.pin_memory = _pin
    torch.Tensor.is_pinned = lambda self, *a, **k: getattr(self, "_stand_in_pinned", False)
    real_to, real_cpu = torch.Tensor.to, torch.Tensor.cpu

    def to(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **{k: v for k, v in kwargs.items() if k != "copy"})[0]
        if device is not None and device.type != self.device.type:
            if self.device.type == "cuda":
                _wait("copy to the host")
            elif not self.is_pinned():
                _wait("copy from pageable host memory")      # cudaMemcpy from pageable memory blocks
        return real_to(self, *args, **kwargs)

    def cpu(self, *args, **kwargs):
        if self.device.type == "cuda":
            _wait("copy to the host")
        return real_cpu(self, *args, **kwargs)

    torch.Tensor.to, torch.Tensor.cpu = to, cpu
    torch.Tensor.backward = lambda self, *a, **k: None
    for name in ("item", "__float__", "__int__", "__index__", "__bool__", "numpy", "tolist"):
        setattr(torch.Tensor, name, _values(name, getattr(torch.Tensor, name)))
    for module in (data, trainer, evaluate):
        module.place = to_device
    real_pick, real_run_device = trainer.pick_device, evaluate.run_device
    trainer.pick_device = lambda name: CUDA if name in ("auto", "cuda") else real_pick(name)
    evaluate.run_device = lambda name: CUDA if name in (None, "auto", "cuda") else real_run_device(name)
    torch.save = _save_checked
    os.environ["LINESIDE_FAST_INFERENCE"] = "torch"     # OpenVINO is the CPU's; on CUDA runs score in PyTorch
    return FakeTensorMode(allow_non_fake_inputs=True)


def job(args: list[str]) -> dict:
    what = args[0]
    if what == "refuse":      # the check the rest rests on
        layer = to_device(torch.nn.Linear(3, 2), CUDA)
        out = {"weight": str(layer.weight.device), "on_device": str(layer(torch.zeros(4, 3, device=CUDA)).device)}
        for name, bad in (("cpu_input", lambda: layer(torch.zeros(4, 3))),
                          ("numpy", lambda: layer(torch.zeros(4, 3, device=CUDA)).numpy())):
            try:
                bad()
                out[name] = "accepted"
            except Exception as exc:  # noqa: BLE001 - which error is the answer
                out[name] = type(exc).__name__
        return out
    if what == "train":
        from lineside.train.config import TrainConfig
        from lineside.train.run import train_run

        if os.environ.get("STAND_IN_MUTANT") == "labels-on-host":    # a mistake to catch: labels left on the CPU
            from lineside.train import loop, trainer

            def host_labels(*a, real=loop.device_batches, **k):
                for xb, yb in real(*a, **k):
                    yield xb, yb.cpu()

            trainer.device_batches = host_labels

        m = train_run(Path(args[1]), Path(args[2]), TrainConfig(**json.loads(args[3])), progress=False)
        return {"device": m["device"], "strategy": m["strategy"], "reason": m["strategy_reason"],
                "calibrated": m["calibration"] is not None, "written": sorted(p.name for p in Path(args[2]).iterdir())}
    if what == "steps":       # the waits within each epoch's steps, step by step
        from lineside.train import loop
        from lineside.train.config import TrainConfig
        from lineside.train.run import train_run

        epochs, real_epoch = [], loop.train_one_epoch

        def counted(forward, *a, **k):
            marks = []

            def step(x):
                marks.append(len(WAITS))
                return forward(x)

            out = real_epoch(step, *a, **k)
            marks.append(len(WAITS))
            epochs.append(marks)
            return out

        loop.train_one_epoch = counted
        if os.environ.get("STAND_IN_MUTANT") == "loss-read-each-step":     # a wait to catch
            real_ce = loop.F.cross_entropy

            def read_each(*a, **k):
                loss = real_ce(*a, **k)
                float(loss)
                return loss

            loop.F = types.SimpleNamespace(cross_entropy=read_each)
        train_run(Path(args[1]), Path(args[2]), TrainConfig(**json.loads(args[3])), progress=False)
        # between the first and the last step of an epoch (the first waits to be timed; after
        # the last the epoch's loss is read), no step may make the host wait
        return {"steps": [len(m) - 1 for m in epochs],
                "waits_between": [WAITS[a:b] for m in epochs for a, b in zip(m[1:-2], m[2:-1]) if b > a],
                "waits_in_epochs": [WAITS[m[0]:m[-1]] for m in epochs]}
    if what == "kernels":     # the convolution shapes each phase of a run brings, first seen where
        import contextlib

        from torch.overrides import TorchFunctionMode

        from lineside.train import loop, trainer
        from lineside.train.config import TrainConfig
        from lineside.train.run import train_run

        phase, amp, first_seen, seen = ["setup"], [None], {}, {}

        @contextlib.contextmanager
        def autocast(self):       # torch.autocast("cuda") switches itself off without CUDA: the dtype it would run
            amp[0] = self.dtype if self.enabled else None
            try:
                yield
            finally:
                amp[0] = None

        class Convolutions(TorchFunctionMode):
            """On CUDA each new (shapes, stride, groups, dtype, layout) of a convolution is a
            new cuDNN plan to set up."""
            def __torch_function__(self, func, types_, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func is torch.nn.functional.conv2d and args[0].device.type == "cuda":
                    x, w = args[0], args[1]
                    stride, groups = (args[3] if len(args) > 3 else kwargs.get("stride", 1),
                                      args[6] if len(args) > 6 else kwargs.get("groups", 1))
                    layout = "channels_last" if x.dim() == 4 and not x.is_contiguous() else "nchw"
                    key = (tuple(x.shape), tuple(w.shape), str(stride), groups, str(amp[0] or x.dtype), layout)
                    first_seen.setdefault(key, phase[0])
                    seen.setdefault(phase[0], set()).add(key)
                return func(*args, **kwargs)

        def during(name, real):
            def run(*a, **k):
                before, phase[0] = phase[0], name
                try:
                    return real(*a, **k)
                finally:
                    phase[0] = before
            return run

        loop.Amp.autocast = autocast
        loop.train_one_epoch = during("training", loop.train_one_epoch)
        trainer.device_logits = during("validation", loop.device_logits)
        trainer.evaluate_bank = during("validation", trainer.evaluate_bank)
        trainer.score = during("calibration and scoring", trainer.score)
        from lineside.train import run as run_module

        for module in (trainer, run_module):    # run.py calls the steps it imported by name
            module.calibrate_temperature = during("calibration and scoring", trainer.calibrate_temperature)
        run_module.score = trainer.score
        with Convolutions():
            train_run(Path(args[1]), Path(args[2]), TrainConfig(**json.loads(args[3])), progress=False)
        counts: dict[str, int] = {}
        for where in first_seen.values():
            counts[where] = counts.get(where, 0) + 1
        training, validation = seen.get("training", set()), seen.get("validation", set())
        return {"new_convolutions": counts, "training": len(training), "validation": len(validation),
                "validation_not_in_training": len(validation - training)}
    if what == "eval":
        from lineside.train import evaluate

        seen, real_score = set(), evaluate.score

        def score(model, *a, **k):      # where the run's network scores
            seen.add(str(next(model.parameters()).device))
            return real_score(model, *a, **k)

        evaluate.score = score
        report = evaluate.evaluate_run(args[1], args[2], progress=False, device="cuda")
        first = sorted(Path(args[2]).rglob("*.png"))[0]
        return {"scored_on": sorted(seen), "n": report["n"],
                "label": evaluate.predict_files(args[1], [first], device="cuda")[0]["label"]}
    if what == "study":
        from lineside.train import study
        from lineside.train.config import TrainConfig

        cfg = TrainConfig(image_size=64, epochs=1, batch_size=8, views=2, calibrate="off")
        data, out = Path(args[2]), Path(args[3])
        if args[1] == "sample-size":
            r = study.sample_size(data, out, cfg, shots=(2, 4), repeats=1, progress=False)
        elif args[1] == "compare":
            r = study.compare(data, out, cfg, strategies=("linear", "finetune", "full"), shots=4, repeats=1,
                              progress=False)
        else:
            r = study.cross_validate(data, out, cfg, folds=2, progress=False)
        return {"study": r["study"], "written": sorted(p.name for p in out.iterdir())}
    raise SystemExit(f"unknown job {what!r}")


def main(args: list[str]) -> int:
    with stand_in():
        try:
            print(json.dumps(job(args)))
            return 0
        except Exception as exc:  # noqa: BLE001 - reported, with where in lineside it happened
            frames = [f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno} {f.line}"
                      for f in traceback.extract_tb(exc.__traceback__) if "site-packages" not in f.filename]
            print(json.dumps({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                              "at": frames}))
            return 1


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)      # no interpreter teardown: collecting the fake tensors at exit can crash it
