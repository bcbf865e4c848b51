"""What several commands share: the options of an exported model (with --profile), and
one way to print an object or its JSON."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
from pathlib import Path

import click

from lineside.errors import LinesideError


@contextlib.contextmanager
def libraries_to_stderr(enabled: bool = True):
    """While a --json command works, whatever the libraries print goes to stderr, so that
    stdout holds the JSON alone: Python's stdout (rich's progress bars), file descriptor
    1 (C++ libraries), and NNCF's log handlers, which hold stdout from their import (its
    INFO lines drop to WARNING too). The command prints its JSON after the block."""
    if not enabled:
        yield
        return
    nncf = logging.getLogger("nncf")
    kept = [(h, h.stream) for h in nncf.handlers if isinstance(h, logging.StreamHandler)]
    level = nncf.level
    nncf.setLevel(max(level, logging.WARNING))
    for handler, _ in kept:
        handler.setStream(sys.stderr)
    sys.stdout.flush()
    try:
        saved = os.dup(1) if sys.stdout.fileno() == 1 else None
    except (AttributeError, OSError, ValueError):     # a stdout with no descriptor (a test runner's)
        saved = None
    if saved is not None:
        os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)
        nncf.setLevel(level)
        for handler, stream in kept:
            handler.setStream(stream)


def emit(obj, as_json: bool, text: str):
    click.echo(json.dumps(obj, indent=2) if as_json else text)


def model_options(f):
    """--backend/--precision/--device/--threads for an exported model, and --profile, whose
    runtime settings fill in whatever of those (and --hint) the command line leaves out."""

    command = f

    @functools.wraps(command)
    def resolved(*args, profile=None, **kw):
        from lineside.devices.probe import auto_profile
        from lineside.devices.profiles import get_profile, resolve_runtime

        keys = [k for k in ("backend", "device", "precision", "threads", "hint") if k in kw]
        chosen = auto_profile() if profile == "auto" else get_profile(profile) if profile else None
        if chosen is not None and profile == "auto":
            click.echo(f"--profile auto: {chosen.name} ({', '.join(f'{k} {v}' for k, v in chosen.runtime.items())})",
                       err=True)
        given_device = kw.get("device") or (chosen.runtime.get("device") if chosen is not None else None)
        settings = resolve_runtime(chosen, **{k: kw[k] for k in keys})
        if "device" in kw and kw.get("model") is not None and given_device is None:
            settings["device"] = None   # open_scorer decides: CPU for an exported model, CUDA when present for a run
        if kw.get("precision") is None and settings["precision"] == "int8":
            settings["precision"] = int8_or_fp32(kw.get("bundle") or kw.get("model"))
        kw.update({k: settings[k] for k in keys})
        return command(*args, **kw)

    f = resolved
    f = click.option("--threads", type=int, default=None, help="CPU threads for an exported model.")(f)
    f = click.option("--device", default=None,
                     help="OpenVINO device for an exported model (CPU, GPU, NPU, AUTO)  [default: CPU]; "
                          "for a training run, cpu or cuda (PyTorch)  [default: cuda when present].")(f)
    f = click.option("--precision", type=click.Choice(["fp32", "int8"]), default=None,
                     help="Which model of a bundle.  [default: fp32]")(f)
    f = click.option("--backend", type=click.Choice(["auto", "onnxruntime", "openvino"]), default=None,
                     help="Runtime for an exported model (auto: OpenVINO if in the bundle).  [default: auto]")(f)
    f = click.option("--profile", default=None,
                     help="Target box profile (a name from `lineside devices list`, a .yaml file, or auto: "
                          "the one `lineside devices probe` finds for this box): its backend, device, "
                          "precision, threads and hint apply where these options are not given.")(f)
    return f


def int8_or_fp32(model) -> str:
    """A profile prefers INT8; a bundle whose INT8 model the accuracy gate refused has
    none, and then the profile's preference yields to FP32 (said on stderr)."""
    from lineside.bundles import bundle_precisions

    folder = Path(model or "")
    try:
        if "int8" in bundle_precisions(folder):
            return "int8"
    except LinesideError:
        return "int8"             # not a bundle folder: opening it will say what is wrong
    click.echo(f"{folder}: the bundle has no INT8 model (the export kept FP32); the profile's "
               "--precision int8 yields to fp32", err=True)
    return "fp32"
