"""The `lineside` command: the group, its error handling, and the commands of
lineside/commands/ (one module per command or group). Commands parse, call one library
function, print; imports are lazy so that `--help` and the runtime commands never load
torch."""

from __future__ import annotations

import logging
import re
import sys

import click

from . import __version__
from .commands.data import data
from .commands.devices import devices
from .commands.export import export
from .commands.keys import keys
from .commands.run import bench_cmd, compare_cmd, review_cmd, run_cmd, score_cmd
from .commands.score import eval_cmd, predict
from .commands.study import study
from .commands.train import train
from .errors import LinesideError


class Group(click.Group):
    """Turns LinesideError, and the GPU running out of memory, into one line on stderr and
    exit status 2, no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LinesideError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except Exception as exc:
            message = _gpu_out_of_memory(exc)
            if message is None:
                raise
            click.echo(f"error: {message}", err=True)
            sys.exit(2)


def _gpu_out_of_memory(exc: BaseException) -> str | None:
    """What to tell the user when `exc` is PyTorch's CUDA out-of-memory error (None otherwise):
    the GPU and its memory, and the options that need less of it."""
    torch = sys.modules.get("torch")      # an exported model's commands never import it
    if torch is None or not isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())):
        return None
    gpu = "the GPU"
    try:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        gpu = f"the GPU ({props.name}, {props.total_memory / 2**30:.0f} GiB)"
    except Exception:  # noqa: BLE001 - the advice stands without the name
        pass
    asked = re.search(r"Tried to allocate ([0-9.]+ [KMGT]iB)", str(exc))
    return (f"{gpu} ran out of memory{f' (it was asked for {asked.group(1)} more)' if asked else ''}: "
            f"try a smaller --batch-size (training), a smaller --image-size, a smaller --backbone, or --device cpu")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="lineside")
@click.option("-v", "--verbose", is_flag=True, help="Log more detail to stderr.")
def main(verbose: bool):
    """Few-shot image inspection for factory stations: classify parts from a few dozen
    images per class, or flag what differs from good parts alone (--task anomaly).

    \b
    Typical flow:
      lineside data synth demo-data            # or bring a folder per class
      lineside train demo-data --out run1      # fine-tune a pretrained backbone
      lineside eval run1 test-data --json      # score it on labelled images
      lineside predict run1 part.png           # classify single images
      lineside export run1 --out bundle        # ONNX + OpenVINO, FP32 and gated INT8
      lineside run bundle --source 0           # decide on every camera frame, log each

    Each command's --help has examples; `lineside study` says how many images you need.
    """
    for stream in (sys.stdout, sys.stderr):   # a file name that is not UTF-8 prints as \xNN, never fails
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


for command in (data, train, eval_cmd, predict, study, export, keys, run_cmd, bench_cmd, review_cmd, compare_cmd,
                score_cmd, devices):
    main.add_command(command)


if __name__ == "__main__":  # pragma: no cover
    main()
