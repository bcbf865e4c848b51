"""The `lineside` command. Commands parse, call one function, print; imports are lazy
so that `--help` and the runtime commands never load torch."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click

from . import __version__
from .errors import LinesideError


class Group(click.Group):
    """Turns LinesideError into one line on stderr and exit status 2, no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LinesideError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="lineside")
@click.option("-v", "--verbose", is_flag=True, help="Log more detail to stderr.")
def main(verbose: bool):
    """Few-shot image classification for inspection stations.

    \b
    Typical flow:
      lineside data synth demo-data            # or bring a folder per class
      lineside train demo-data --out run1      # fine-tune a pretrained backbone
      lineside eval run1 test-data --json      # score it on labelled images
      lineside predict run1 part.png           # classify single images
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def _emit(obj, as_json: bool, text: str):
    click.echo(json.dumps(obj, indent=2) if as_json else text)


# --- data ---------------------------------------------------------------------------

@main.group()
def data():
    """Make and inspect datasets."""


@data.command("synth")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--per-class", default=40, show_default=True, help="Images per class.")
@click.option("--size", default=128, show_default=True, help="Image side in pixels.")
@click.option("--seed", default=0, show_default=True, help="Same seed, same images.")
@click.option("--classes", default=None, help="Comma-separated subset of card,cube,hat,screw,torch.")
def data_synth(out: Path, per_class: int, size: int, seed: int, classes: str | None):
    """Draw a synthetic parts dataset (hat, cube, card, torch, screw) into OUT/<class>/.

    Parts get a random pose, scale, shade, lighting, background and noise; use it
    to try lineside end to end before you have photos of your own parts."""
    from .synth import CLASSES, write_dataset

    names = tuple(c.strip() for c in classes.split(",")) if classes else CLASSES
    counts = write_dataset(out, per_class=per_class, size=size, seed=seed, classes=names)
    click.echo(f"wrote {sum(counts.values())} images in {len(counts)} classes to {out}")


@data.command("video")
@click.argument("data_dir", metavar="DATA", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--size", default="640x480", show_default=True, help="Frame size WIDTHxHEIGHT.")
@click.option("--fps", default=30.0, show_default=True, help="Frame rate written into the file.")
@click.option("--hold", default=1, show_default=True, help="Frames each part stays in view.")
@click.option("--limit", type=int, default=None, help="Use at most this many images.")
@click.option("--noise", default=2.0, show_default=True, help="Sensor noise in grey levels (0: none).")
@click.option("--seed", default=0, show_default=True, help="Order of the parts and the noise.")
@click.option("--json", "as_json", is_flag=True, help="Print the frame count and the label of every part.")
def data_video(data_dir: Path, out: Path, size: str, fps: float, hold: int, limit, noise: float, seed: int,
               as_json: bool):
    """Make a conveyor-style video (OUT.mp4 or OUT.avi) from the labelled images in DATA.

    Each image is centred on a grey frame for HOLD frames, in a seeded random
    order: a stand-in camera for `lineside run` and `lineside bench`."""
    from .video import parse_size, write_video

    r = write_video(data_dir, out, size=parse_size(size), fps=fps, hold=hold, shuffle_seed=seed, limit=limit,
                    noise=noise)
    _emit(r, as_json, f"wrote {r['frames']} frames ({r['parts']} parts, {r['size'][0]}x{r['size'][1]} at "
                      f"{r['fps']:g} fps) to {out}")


# --- train --------------------------------------------------------------------------

def _list_backbones(ctx, _param, value):
    if not value or ctx.resilient_parsing:
        return
    from lineside.train.backbones import BACKBONES

    for name in BACKBONES.names():
        entry = BACKBONES.get(name)
        s = entry.input_spec
        click.echo(f"{name:20s} {s.height}x{s.width}  {entry.description}")
    ctx.exit(0)


@main.command()
@click.argument("data_dir", metavar="DATA", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder to write (model.pt, metrics.json, ...).")
@click.option("--list-backbones", is_flag=True, expose_value=False, is_eager=True, callback=_list_backbones,
              help="List the available backbones and exit.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="YAML file of training options; command-line options override it.")
@click.option("--backbone", default=None, help="Backbone name (see --list-backbones). [efficientnet_lite0]")
@click.option("--weights", default=None,
              help="imagenet, none, or a path to a local weight file. [imagenet]")
@click.option("--strategy", type=click.Choice(["auto", "linear", "finetune", "full", "scratch"]), default=None,
              help="linear: frozen backbone + new head; finetune: head, then deepest stages at lr/10; "
                   "full: everything from the start; scratch: full from random weights; "
                   "auto: chosen from images per class. [auto]")
@click.option("--unfreeze", default=None, help="finetune: number of deepest stages to train, or 'all'. [auto]")
@click.option("--taps", default=None,
              help="linear: stages whose pooled outputs feed the head: last, mid (middle to second-to-last: "
                   "better for textures such as surface defects), or stage numbers 'a,b,c'. [last]")
@click.option("--epochs", type=int, default=None, help="Epochs (default depends on the strategy).")
@click.option("--batch-size", type=int, default=None, help="[32]")
@click.option("--lr", type=float, default=None, help="Learning rate of a new head; backbone layers use lr/10. [1e-3]")
@click.option("--label-smoothing", type=float, default=None, help="[0.1]")
@click.option("--balance", type=click.Choice(["loss", "sampler", "none"]), default=None,
              help="Class imbalance: weighted loss, balanced sampling, or nothing. [loss]")
@click.option("--flip/--no-flip", default=None, help="Random flips (off when orientation matters). [on]")
@click.option("--rot90/--no-rot90", default=None, help="Random 90-degree rotations. [on]")
@click.option("--views", type=int, default=None,
              help="Augmented views per image cached through the frozen layers. [auto]")
@click.option("--tta", type=click.Choice(["auto", "on", "off"]), default=None,
              help="Test-time views: average the model over the flips/turns it was trained with "
                   "(4 passes per image; +0.3 points at 10 NEU images per class). auto: for the linear "
                   "recipe. `lineside export --tta off` drops them from an exported model. [auto]")
@click.option("--val", "val_dir", type=click.Path(path_type=Path), default=None,
              help="Validation folder (instead of a split of DATA).")
@click.option("--val-fraction", type=float, default=None,
              help="Fraction of each class held out for validation. [0.2 when every class has 25+ images, else 0]")
@click.option("--patience", type=int, default=None, help="Early stopping patience in epochs. [6]")
@click.option("--image-size", type=int, default=None, help="Square input size (default: the backbone's).")
@click.option("--seed", type=int, default=None, help="[0]")
@click.option("--threads", type=int, default=None, help="CPU threads for torch.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="auto: CUDA when there is a GPU (the run's metrics.json names the device used). [auto]")
@click.option("--gpus", "processes", type=int, default=None,
              help="Train data-parallel in this many processes on this machine, one per GPU (without CUDA, "
                   "CPU processes), through torchrun and DistributedDataParallel. --batch-size is per "
                   "process. Several machines: start `torchrun ... -m lineside.cli train ...` on each (README).")
@click.option("--skip-bad", is_flag=True, default=None, help="Skip unreadable images with a warning instead of failing.")
@click.option("--force", is_flag=True, help="Overwrite a run folder that already holds a model.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def train(data_dir, out, config_file, val_dir, processes, force, quiet, as_json, **options):
    """Train a classifier on DATA (one sub-folder per class, or a path,label CSV).

    \b
    Examples:
      lineside train parts/ --out runs/parts
      lineside train parts/ --out runs/p2 --strategy linear
      lineside train parts/ --out runs/p3 --backbone resnet18 --weights resnet18.pth --no-rot90
    """
    from lineside.train import distributed
    from lineside.train.config import TrainConfig
    from lineside.train.run import check_out_dir, train_run

    cfg = TrainConfig.from_yaml(config_file, **options) if config_file else TrainConfig().override(**options)
    dist = distributed.from_env()
    if dist.main:
        check_out_dir(out, force)
    if processes is not None and processes < 1:
        raise LinesideError(f"--gpus: {processes} is not a number of processes (1 or more)")
    if processes and processes > 1 and not dist.active:
        import subprocess

        import torch

        if cfg.device != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() < processes:
            raise LinesideError(f"--gpus {processes}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        argv = distributed.without_option(sys.argv[1:], "--gpus")
        sys.exit(subprocess.run(distributed.torchrun_args(processes, argv)).returncode)
    m = train_run(data_dir, out, cfg, val=val_dir, progress=not quiet)
    if not dist.main:
        return
    if as_json:
        click.echo(json.dumps(m, indent=2))
        return
    click.echo(m["strategy_reason"])
    where = m["device"] + (f", {m['processes']} processes" if m.get("processes", 1) > 1 else "")
    click.echo(f"trained {m['backbone']} ({m['strategy']}) on {sum(m['train_counts'].values())} images "
               f"in {m['seconds']['total']:.0f} s on {where}; {m['split']}")
    if m["plan"]["test_views"]:
        click.echo(f"predictions average {len(m['plan']['test_views'])} flipped/turned views of each image "
                   f"(--tta off for one pass)")
    if m["validation"]:
        v = m["validation"]
        click.echo(f"validation: balanced accuracy {v['balanced_accuracy']:.1%}, accuracy {v['accuracy']:.1%} "
                   f"on {v['n']} images")
    click.echo(f"wrote {out}/model.pt, metrics.json, history.csv, confusion_matrix.png, config.yaml")


# --- eval / predict -----------------------------------------------------------------

def _is_exported(path: Path) -> bool:
    return (path.is_dir() and (path / "bundle.json").is_file()) or path.name == "bundle.json" \
        or path.suffix in (".onnx", ".xml")


def _model_options(f):
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
        settings = resolve_runtime(chosen, **{k: kw[k] for k in keys})
        if kw.get("precision") is None and settings["precision"] == "int8":
            settings["precision"] = _int8_or_fp32(kw.get("bundle") or kw.get("model"))
        kw.update({k: settings[k] for k in keys})
        return command(*args, **kw)

    f = resolved
    f = click.option("--threads", type=int, default=None, help="CPU threads for an exported model.")(f)
    f = click.option("--device", default=None,
                     help="OpenVINO device for an exported model (CPU, GPU, NPU, AUTO).  [default: CPU]")(f)
    f = click.option("--precision", type=click.Choice(["fp32", "int8"]), default=None,
                     help="Which model of a bundle.  [default: fp32]")(f)
    f = click.option("--backend", type=click.Choice(["auto", "onnxruntime", "openvino"]), default=None,
                     help="Runtime for an exported model (auto: OpenVINO if in the bundle).  [default: auto]")(f)
    f = click.option("--profile", default=None,
                     help="Target box profile (a name from `lineside devices list`, a .yaml file, or auto: "
                          "the one `lineside devices probe` finds for this box): its backend, device, "
                          "precision, threads and hint apply where these options are not given.")(f)
    return f


def _int8_or_fp32(model) -> str:
    """A profile prefers INT8; a bundle whose INT8 model the accuracy gate refused has
    none, and then the profile's preference yields to FP32 (said on stderr)."""
    from lineside.runtime.model import bundle_precisions

    folder = Path(model or "")
    try:
        if "int8" in bundle_precisions(folder):
            return "int8"
    except LinesideError:
        return "int8"             # not a bundle folder: opening it will say what is wrong
    click.echo(f"{folder}: the bundle has no INT8 model (the export kept FP32); the profile's "
               "--precision int8 yields to fp32", err=True)
    return "fp32"


def _open_scorer(model: Path, backend, precision, device, threads):
    """(predict_proba, labels, spec, description) for a run folder or an exported model.
    Exported models never import torch."""
    if _is_exported(model):
        from lineside.runtime.model import open_model

        m = open_model(model, backend=backend, precision=precision, device=device, threads=threads)
        return m.predict_proba, m.labels, m.spec, {"model": str(m.path), "backend": m.backend}
    from lineside.train.checkpoint import load_checkpoint, resolve_checkpoint
    from lineside.train.evaluate import RunScorer

    loaded = load_checkpoint(model)
    return (RunScorer(loaded.model), loaded.labels, loaded.spec,
            {"model": str(resolve_checkpoint(model)), "backend": "pytorch"})


@main.command("eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("data_dir", metavar="DATA", type=click.Path(path_type=Path))
@_model_options
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images with a warning instead of failing.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_cmd(model, data_dir, backend, precision, device, threads, skip_bad, quiet, as_json):
    """Score MODEL on DATA (a folder per class, or a path,label CSV).

    MODEL is a training run folder (or its model.pt), an exported bundle folder,
    or a lone .onnx / .xml file. Reports balanced accuracy (the mean of per-class
    recall, fair when classes are imbalanced), accuracy, per-class
    precision/recall/f1 and the confusion matrix (rows: true class)."""
    from lineside.scoring import evaluate

    predict_fn, labels, spec, about = _open_scorer(model, backend, precision, device, threads)
    r = evaluate(predict_fn, labels, spec, data_dir, skip_bad=skip_bad, progress=not quiet and not as_json)
    r.update(about)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(f"{r['n']} images: balanced accuracy {r['balanced_accuracy']:.2%}, accuracy {r['accuracy']:.2%} "
               f"({r['backend']})")
    click.echo(f"{'class':24s} {'precision':>9s} {'recall':>7s} {'f1':>6s} {'n':>5s}")
    for name, c in r["per_class"].items():
        click.echo(f"{name:24s} {c['precision']:9.3f} {c['recall']:7.3f} {c['f1']:6.3f} {c['support']:5d}")
    if r["misclassified"]:
        click.echo(f"{len(r['misclassified'])} misclassified (see --json for the list)")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@_model_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per image.")
def predict(model, images, backend, precision, device, threads, as_json):
    """Classify IMAGES (files, or folders of images) with MODEL.

    MODEL is a run folder, a bundle folder or a lone .onnx / .xml file. Prints the
    predicted label, its probability and the probability of every class."""
    from lineside.scoring import predict_paths

    predict_fn, labels, spec, _ = _open_scorer(model, backend, precision, device, threads)
    results = predict_paths(predict_fn, labels, spec, list(images))
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for r in results:
        probs = "  ".join(f"{k}={v:.3f}" for k, v in sorted(r["probabilities"].items(), key=lambda kv: -kv[1]))
        click.echo(f"{r['path']}: {r['label']} ({r['confidence']:.1%})   {probs}")


# --- study --------------------------------------------------------------------------

def _study_options(f):
    f = click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON.")(f)
    f = click.option("--quiet", is_flag=True, help="No progress bars.")(f)
    f = click.option("--views", default=2, show_default=True,
                     help="linear recipe: views per image in the shared feature cache: its allowed flips and turns, "
                          "then VIEWS-1 randomly augmented copies.")(f)
    f = click.option("--threads", type=int, default=None, help="CPU threads for torch.")(f)
    f = click.option("--image-size", type=int, default=None, help="Square input size (default: the backbone's).")(f)
    f = click.option("--backbone", default=None, help="Backbone name (see lineside train --list-backbones).")(f)
    f = click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="YAML of training options, as for lineside train.")(f)
    f = click.option("--skip-bad", is_flag=True, default=None, help="Skip unreadable images with a warning.")(f)
    return f


def _study_config(config_file, **options):
    from lineside.train.config import TrainConfig

    options = {k: v for k, v in options.items() if v is not None}
    return TrainConfig.from_yaml(config_file, **options) if config_file else TrainConfig().override(**options)


def _ints(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"'{text}' is not a comma-separated list of integers", param_hint=option) from None


@main.group()
def study():
    """Plan a project: how many images per class, which recipe, and cross-validation.

    \b
      lineside study sample-size DATA --target 0.99     # images per class for a target
      lineside study compare DATA --shots 10            # linear vs finetune vs full vs scratch
      lineside study cv DATA --folds 5                  # k-fold scores, confusions, suspicious labels
    """


@study.command("sample-size")
@click.argument("data_dir", metavar="DATA", type=click.Path(path_type=Path))
@click.option("--shots", default="1,2,5,10,20,50", show_default=True, help="Training images per class to try.")
@click.option("--repeats", default=5, show_default=True, help="Random draws per size.")
@click.option("--strategy", type=click.Choice(["auto", "linear", "finetune", "full", "scratch"]), default="auto",
              show_default=True, help="Recipe to study (linear is by far the fastest: features are shared).")
@click.option("--target", default=0.99, show_default=True, help="Balanced accuracy to reach (0..1).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("study-sample-size"),
              show_default=True)
@_study_options
def study_sample_size(data_dir, shots, repeats, strategy, target, out, config_file, as_json, quiet, views,
                      **options):
    """How many images per class does DATA need to reach --target?

    For each size, draws that many training images per class (seeded, --repeats
    times), trains, and scores on every image not drawn. Fits a learning curve
    (inverse power law), estimates the size for the target with an 80% interval,
    and says so plainly when the data cannot support an estimate. Writes
    learning_curve.png, sample_size.json and report.md (with per-class curves)."""
    from lineside.train.study import sample_size

    if not 0 < target < 1:
        raise click.BadParameter("must be between 0 and 1 (0.99 means 99%)", param_hint="--target")
    if repeats < 1:
        raise click.BadParameter("must be at least 1", param_hint="--repeats")
    cfg = _study_config(config_file, strategy=strategy, **options)
    r = sample_size(data_dir, out, cfg, shots=_ints(shots, "--shots"), repeats=repeats, target=target, views=views,
                    progress=not quiet and not as_json)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    for s in r["sizes"]:
        click.echo(f"{s['shots']:>4} per class: {s['mean']:.2%} ± {s['std']:.2%}")
    click.echo(f"estimate for {target:.2%}: {r['estimate']['statement']}")
    check = r["extrapolation_check"]
    if check:
        click.echo("check (fit on " + ",".join(map(str, check["fit_sizes"])) + "): " + "; ".join(
            f"{p['size']}/class predicted {p['predicted']:.2%}, measured {p['measured']:.2%}" for p in check["predictions"]))
    click.echo(f"wrote {out}/learning_curve.png, sample_size.json, report.md ({r['seconds']:.0f} s)")


@study.command("compare")
@click.argument("data_dir", metavar="DATA", type=click.Path(path_type=Path))
@click.option("--strategies", default="linear,finetune,full,scratch", show_default=True)
@click.option("--shots", default=10, show_default=True, help="Training images per class.")
@click.option("--repeats", default=3, show_default=True, help="Random draws, shared by every recipe.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("study-compare"),
              show_default=True)
@_study_options
def study_compare(data_dir, strategies, shots, repeats, out, config_file, as_json, quiet, views, **options):
    """Which recipe suits DATA? Trains each strategy on the same draws (a paired
    comparison) and reports balanced accuracy and training time, and the time
    saved against training from scratch. Writes compare.png, compare.json, report.md."""
    from lineside.train.config import STRATEGIES
    from lineside.train.study import compare

    names = [s.strip() for s in strategies.split(",") if s.strip()]
    bad = [s for s in names if s not in STRATEGIES or s == "auto"]
    if bad or not names:
        raise click.BadParameter(f"{', '.join(bad) or 'empty'}: choose from linear, finetune, full, scratch",
                                 param_hint="--strategies")
    if repeats < 1:
        raise click.BadParameter("must be at least 1", param_hint="--repeats")
    cfg = _study_config(config_file, **options)
    r = compare(data_dir, out, cfg, strategies=names, shots=shots, repeats=repeats, views=views,
                progress=not quiet and not as_json)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    for n in names:
        s = r["summary"][n]
        click.echo(f"{n:>9}: {s['mean']:.2%} ± {s['std']:.2%} (vs best {s['vs_best_points']:+.2f} points), "
                   f"{s['train_s_mean']:.0f} s per draw")
    click.echo(f"best: {r['best']}; wrote {out}/compare.png, compare.json, report.md ({r['seconds']:.0f} s)")


@study.command("cv")
@click.argument("data_dir", metavar="DATA", type=click.Path(path_type=Path))
@click.option("--folds", default=5, show_default=True)
@click.option("--strategy", type=click.Choice(["auto", "linear", "finetune", "full", "scratch"]), default="auto",
              show_default=True)
@click.option("--seed", default=0, show_default=True, help="Assignment of images to folds.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("study-cv"), show_default=True)
@_study_options
def study_cv(data_dir, folds, strategy, seed, out, config_file, as_json, quiet, views, **options):
    """Stratified k-fold cross-validation on DATA: per-fold and pooled metrics, the
    pooled confusion matrix, and every image misclassified in its fold, most
    confident first (the usual way to find mislabelled images in a small set).
    Writes cv.json, confusion_matrix.png, report.md."""
    from lineside.train.study import cross_validate

    cfg = _study_config(config_file, strategy=strategy, seed=seed, **options)
    r = cross_validate(data_dir, out, cfg, folds=folds, views=views, progress=not quiet and not as_json)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(f"{folds} folds ({', '.join(r['strategies_used'])}): balanced accuracy {r['mean']:.2%} ± "
               f"{r['std']:.2%} per fold, pooled {r['pooled']['balanced_accuracy']:.2%}")
    for w in r["misclassified"][:10]:
        click.echo(f"  {w['path']}: labelled {w['true']}, predicted {w['predicted']} ({w['confidence']:.0%})")
    if len(r["misclassified"]) > 10:
        click.echo(f"  ... {len(r['misclassified']) - 10} more in {out}/cv.json")
    click.echo(f"wrote {out}/cv.json, confusion_matrix.png, report.md ({r['seconds']:.0f} s)")


# --- export -------------------------------------------------------------------------

@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Bundle folder to write.")
@click.option("--formats", default="onnx,openvino", show_default=True,
              help="Comma-separated: onnx, openvino.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="Images for the parity check (default: the run's training data, if present).")
@click.option("--int8/--no-int8", default=True, show_default=True,
              help="Also write INT8 models (OpenVINO through NNCF, ONNX through ONNX Runtime's static "
                   "quantizer), each kept only if it passes the accuracy gate.")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Calibration images (default: the run's training data).")
@click.option("--eval", "eval_dir", type=click.Path(path_type=Path), default=None,
              help="Labelled held-out images on which FP32 and INT8 are compared. Without it, half of the "
                   "calibration images (per class) are held out of calibration and INT8 is judged on them "
                   "and on augmented copies of them.")
@click.option("--max-drop", type=float, default=0.3, show_default=True,
              help="Largest loss of balanced accuracy (percentage points) an INT8 model may have.")
@click.option("--min-agreement", type=float, default=99.5, show_default=True,
              help="Smallest share of evaluation images (percent) on which INT8 must give FP32's label.")
@click.option("--speed-seconds", default=1.0, show_default=True,
              help="Seconds to time each model's latency and throughput for the report (0: skip).")
@click.option("--tta", type=click.Choice(["keep", "off"]), default="keep", show_default=True,
              help="A model trained with test-time views (lineside train --tta) runs 4 flipped/turned "
                   "copies of each image; off exports one pass per image: 4-5x faster, a little "
                   "less accurate (compare with --eval).")
@click.option("--force", is_flag=True, help="Replace a bundle already in --out (its files are removed first).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print bundle.json and the report as one JSON object.")
def export(run, out, formats, data_dir, int8, calib, eval_dir, max_drop, min_agreement, speed_seconds, tta, force,
           quiet, as_json):
    """Export a training RUN to a bundle of ONNX / OpenVINO models (FP32, and INT8 that passed its gate).

    The models take uint8 RGB images (N, H, W, 3) at the size in their metadata
    and return class probabilities: normalisation and softmax are inside the
    graph. Labels, input spec and provenance are stored inside each model file
    and in bundle.json, with a sha256 of every file. Every export checks that
    ONNX Runtime and OpenVINO agree with PyTorch (max probability difference
    <= 1e-4) and fails if they do not."""
    from lineside.export.bundle import export_bundle, judged_on

    result = export_bundle(run, out, formats=[f.strip() for f in formats.split(",") if f.strip()], data=data_dir,
                           int8=int8, calib=calib, eval_data=eval_dir, max_drop=max_drop,
                           min_agreement=min_agreement, progress=not quiet and not as_json,
                           speed_seconds=speed_seconds, tta=tta == "keep", force=force)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    parity = result["report"]["parity"]
    for name, r in parity["results"].items():
        click.echo(f"parity {name}: max |p - p_torch| = {r['max_abs_diff']:.1e}, "
                   f"top-1 agreement {r['top1_agreement']:.1%} ({parity['images']})")
    for runtime, q in result["report"].get("int8", {}).items():
        if q["verdict"] == "kept":
            g = q["gate"]
            click.echo(f"INT8 {runtime} kept ({q['recipe']}): balanced accuracy {g['int8_balanced_accuracy']:.2%} vs "
                       f"FP32 {g['fp32_balanced_accuracy']:.2%} (drop {g['drop_points']:.2f} points, limit "
                       f"{g['max_drop_points']}), top-1 agreement {g['top1_agreement']:.1%} on {judged_on(q)}")
        elif q["verdict"] == "refused":
            click.echo(f"INT8 {runtime} refused: {q['why']} (judged on {judged_on(q)})")
        else:
            click.echo(f"INT8 {runtime} {q['verdict']}: {q['why']}")
    for key, r in result["report"]["models"].items():
        speed = (f", {r['latency_ms']:.2f} ms per image, {r['throughput_fps']:.0f} FPS" if "latency_ms" in r else "")
        extra = f" ({r['speedup_vs_fp32']:.2f}x FP32)" if "speedup_vs_fp32" in r else ""
        click.echo(f"{key}: {r['bytes'] / 2**20:.1f} MiB{speed}{extra}")
    click.echo(f"wrote {out}/bundle.json, export_report.json, export_report.md")


# --- run / bench ----------------------------------------------------------------------

def _runtime_options(f):
    f = click.option("--hint", type=click.Choice(["auto", "latency", "throughput"]), default=None,
                     help="Inference mode: latency (one request, a camera at its rate) or throughput "
                          "(requests in parallel). auto: throughput for a file read unpaced, else "
                          "latency.  [default: auto]")(f)
    f = click.option("--pace", type=float, default=None,
                     help="Replay a file or folder at this many frames per second (camera rate).")(f)
    f = click.option("--source", "source", default=None,
                     help="Camera index (0), video file, folder of images, rtsp:// or http:// URL, "
                          "or a GStreamer pipeline.")(f)
    return _model_options(f)


def _open_runtime_model(bundle, backend, precision, device, threads):
    from lineside.runtime.model import open_model

    return open_model(bundle, backend=backend, precision=precision, device=device, threads=threads)


@main.command("run")
@click.argument("bundle", type=click.Path(path_type=Path))
@_runtime_options
@click.option("--loop", is_flag=True, help="Start a file or folder again at its end.")
@click.option("--roi", default=None, help="x,y,w,h: classify only this region of each frame (pixels).")
@click.option("--reject-below", type=float, default=None,
              help="Label frames whose top probability is below this 'unknown'. [the bundle's threshold]")
@click.option("--ok-classes", default=None, help="Comma-separated labels that mean OK; the rest (and unknown) are NG.")
@click.option("--vote", default=None,
              help="N/M: decide a label seen in at least N of the last M frames. The summary counts runs of "
                   "one voted label: parts of one class that follow each other with no other label between "
                   "them are one run, so it is a part count only where that cannot happen.")
@click.option("--log", "log_path", default="decisions.sqlite", show_default=True,
              help="Decision log: a SQLite file (.sqlite, .sqlite3 or .db), or a .jsonl file for JSON lines "
                   "(extension in any case); 'none' for no log.")
@click.option("--save", "save_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the frames worth a look (JPEG, named lineside_*.jpg). Only those files are "
                   "ever deleted by the caps below; a frame that cannot be saved is a save_failed event, "
                   "never a lost decision.")
@click.option("--save-when", default="ng,unknown", show_default=True,
              help="Which frames to save: comma-separated from ng, unknown, flagged, all.")
@click.option("--save-max-files", default=1000, show_default=True,
              help="Keep at most this many saved frames (the oldest lineside_*.jpg go first).")
@click.option("--save-max-mb", default=500.0, show_default=True, help="Keep at most this much in saved frames.")
@click.option("--frames", "max_frames", type=int, default=None, help="Stop after this many frames.")
@click.option("--seconds", type=float, default=None, help="Stop after this many seconds.")
@click.option("--source-timeout", type=float, default=None,
              help="End the run (exit status 3) when the source has delivered no frame for this many seconds, "
                   "at the start or after a loss; for a supervisor that restarts or raises an alarm. "
                   "[wait and reconnect for ever]")
@click.option("--mqtt", default=None, metavar="URL",
              help="Publish every decision to an MQTT broker: mqtt://[user:pass@]HOST[:PORT]/TOPIC/PREFIX "
                   "(mqtts:// for TLS). Topics PREFIX/decision and PREFIX/event (QoS 1) and PREFIX/status "
                   "(retained; offline is the last will). The loop never waits on the broker.")
@click.option("--mqtt-ca", default=None, metavar="FILE", help="CA certificate file for an mqtts:// broker.")
@click.option("--mqtt-queue", default=10_000, show_default=True,
              help="Messages kept while the broker is away; beyond that they are dropped and counted.")
@click.option("--station", default=None, help="Station name in published messages. [this host's name]")
@click.option("--opcua", default=None, metavar="ENDPOINT",
              help="Serve an OPC UA object for the station (e.g. opc.tcp://127.0.0.1:4840; 0.0.0.0 to reach "
                   "it from the plant network): last label, class index, confidence, OK/NG, part id, counters, "
                   "status. Anonymous clients read and subscribe only; no encryption (see README).")
@click.option("--opcua-user", default=None,
              help="The user who may call Trigger(PartId) over OPC UA; the password comes from "
                   "LINESIDE_OPCUA_PASSWORD. Without it, nobody may write or call.")
@click.option("--trigger", type=click.Choice(["stdin", "mqtt", "opcua"]), default=None,
              help="Answer triggered parts: each line on stdin (its text, if any, is the part id), each "
                   "message on PREFIX/trigger, or each OPC UA Trigger(PartId) call asks for the decision on "
                   "the next frame (with --vote N/M, the next M frames). The answer (part id, label, OK/NG, "
                   "reason) goes to stdout as a JSON line (stdin), PREFIX/answer (MQTT), LastAnswer (OPC UA) "
                   "and the log. Needs --ok-classes. [free-running]")
@click.option("--trigger-timeout", "trigger_timeout_ms", default=1000.0, show_default=True,
              help="Milliseconds within which a triggered part gets its answer; when none is ready, the "
                   "answer is NG with reason no_frame (no frame came) or timeout (fail safe).")
@click.option("--display", is_flag=True, help="Show frames with label, confidence, OK/NG and FPS (needs a screen).")
@click.option("--quiet", is_flag=True, help="No live status line.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def run_cmd(bundle, source, pace, hint, backend, precision, device, threads, loop, roi, reject_below, ok_classes,
            vote, log_path, save_dir, save_when, save_max_files, save_max_mb, max_frames, seconds, source_timeout,
            mqtt, mqtt_ca, mqtt_queue, station, opcua, opcua_user, trigger, trigger_timeout_ms, display, quiet,
            as_json):
    """Classify every frame from --source with an exported BUNDLE and record each decision.

    \b
    Examples:
      lineside run bundle --source 0 --ok-classes ok --reject-below 0.8
      lineside run bundle --source rtsp://10.0.0.7/stream --roi 100,40,400,400
      lineside run bundle --source parts.mp4 --pace 30 --log shift.sqlite

    The newest frame is always the one classified (a frame the model had no time
    for is dropped and counted, never queued), a lost camera is reconnected with
    backoff, and black or frozen frames are flagged. Every decision goes to the
    log (SQLite, WAL). Ctrl-C or SIGTERM stops capture, finishes the frames in
    flight, closes the log and exits 0. Never imports torch.

    \b
    Faults are events in the log, never a stopped line:
      frame not saved (full disk)    save_failed; the decision is logged
      log unwritable (disk, lock)    decisions wait in memory, retried; log_unwritable
      log file deleted               a new one is started; log_recreated
      damaged video frame            skipped, reading goes on; decode_error
      frame the --roi does not fit   decided unknown (NG), flag roi_outside
      camera or stream lost          reconnected with backoff; source_lost, source_back

    \b
    Exit status:
      0  the run ended normally (end of source, --frames, --seconds, a signal)
      2  a setup error: bad option, bundle, --roi, --log or --save path
      3  the source never delivered a frame, or none for --source-timeout seconds
      4  decisions were made that are not in the log (the summary's not_logged)"""
    from lineside.runtime.app import RunOptions, run_app

    if source is None:
        raise click.UsageError("--source is required (a camera index, file, folder, URL or pipeline)")
    options = RunOptions(source=source, pace=pace, hint=hint, loop=loop, roi=roi, reject_below=reject_below,
                         ok_classes=ok_classes, vote=vote, log=None if log_path == "none" else log_path,
                         save_dir=save_dir, save_when=save_when, save_max_files=save_max_files,
                         save_max_mb=save_max_mb, max_frames=max_frames, seconds=seconds,
                         source_timeout=source_timeout, mqtt=mqtt, mqtt_ca=mqtt_ca, mqtt_queue=mqtt_queue,
                         station=station, trigger=trigger, trigger_timeout_ms=trigger_timeout_ms, opcua=opcua,
                         opcua_user=opcua_user, display=display,
                         status=not quiet and not as_json)
    model = _open_runtime_model(bundle, backend, precision, device, threads)
    summary = run_app(model, options)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_run_summary(summary, vote)
    code = summary["exit_code"]
    if code == 3:
        click.echo(f"error: --source {source}: " + (
            f"no frame for {source_timeout:g} s (--source-timeout)" if summary.get("source_timeout")
            else "no frame was ever received (see the source_unavailable events in the log)"), err=True)
    elif code == 4:
        click.echo(f"error: {summary['not_logged']} decisions are not in the log {summary['log']} "
                   "(it could not be written; see the log_unwritable events)", err=True)
    if code:
        sys.exit(code)


def _print_run_summary(summary: dict, vote) -> None:
    lat = summary["latency_ms"]
    click.echo(f"{summary['frames']} frames in {summary['seconds']:.1f} s ({summary['fps']:.1f} FPS), "
               f"dropped {summary['dropped']}, capture-to-decision p50 {lat.get('p50', 0):.1f} ms "
               f"p99 {lat.get('p99', 0):.1f} ms, peak RSS {summary['rss_mb']:.0f} MB")
    click.echo("frames per label: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["labels"].items())))
    if vote:
        click.echo("runs of one voted label (two parts of a class in a row are one run): "
                   + ", ".join(f"{k} {v}" for k, v in sorted(summary["voted_runs"].items())))
    if summary["verdicts"]:
        click.echo("verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["verdicts"].items())))
    if summary["flags"]:
        click.echo("flagged frames: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["flags"].items())))
    if summary.get("answers"):
        click.echo("triggered parts answered: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["answers"].items())))
    faults = {k: summary.get(k) for k in ("decode_errors", "save_failed", "not_logged", "log_recreated",
                                          "mqtt_dropped", "output_errors")}
    if any(faults.values()):
        click.echo("faults: " + ", ".join(f"{k} {v}" for k, v in faults.items() if v))
    if summary.get("log"):
        click.echo(f"{summary['logged']} decisions logged to {summary['log']}")


@main.command("bench")
@click.argument("bundle", type=click.Path(path_type=Path))
@_runtime_options
@click.option("--roi", default=None, help="x,y,w,h: classify only this region of each frame, as `lineside run` does.")
@click.option("--seconds", default=10.0, show_default=True, help="Seconds for each of the three measurements.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench_cmd(bundle, source, pace, hint, backend, precision, device, threads, roi, seconds, as_json):
    """Measure the real camera loop on BUNDLE, and in the same run a naive loop and the raw backend.

    Without --source, a short video of drawn parts is made in a temporary folder.
    Reports end-to-end FPS, per-stage latency (capture, preprocess, infer,
    postprocess, record) with p50/p95/p99, capture-to-decision latency, dropped
    frames and peak RSS. With --pace the file is replayed at camera rate, which
    is how latency on the line is measured."""
    from lineside.runtime.bench import bench

    model = _open_runtime_model(bundle, backend, precision, device, threads)
    r = bench(model, source, seconds=seconds, pace=pace, hint=hint, roi=roi)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    lat = r["latency_ms"]
    click.echo(f"{r['backend']} {Path(r['model']).name} ({r['engine']['hint']}, {r['engine']['requests']} requests), "
               f"source: {r['source']}" + (f" paced at {r['pace']:g} FPS" if r["pace"] else ""))
    click.echo(f"pipeline: {r['fps']:.1f} FPS, capture-to-decision p50 {lat.get('p50', 0):.2f} ms "
               f"p99 {lat.get('p99', 0):.2f} ms, dropped {r['dropped']}, peak RSS {r['rss_mb']:.0f} MB")
    for name, st in r["stages_ms"].items():
        if st.get("count"):
            click.echo(f"  {name:12s} p50 {st['p50']:7.3f}  p95 {st['p95']:7.3f}  p99 {st['p99']:7.3f} ms")
    if "naive_fps" in r:
        click.echo(f"naive loop: {r['naive_fps']:.1f} FPS (pipeline {r['fps_vs_naive']:.2f}x)")
    click.echo(f"raw backend: {r['raw_fps']:.1f} FPS (pipeline {r['fps_vs_raw']:.2f}x)")
    if "ceiling_fps" in r:
        click.echo(f"decode + resize alone: {r['decode_fps']:.1f} FPS on one thread; ceiling for this box "
                   f"(inference + decoding, no overhead): {r['ceiling_fps']:.1f} FPS (pipeline "
                   f"{r['fps_vs_ceiling']:.2f}x)")


# --- devices --------------------------------------------------------------------------

@main.group()
def devices():
    """Target box profiles, and what this box is.

    \b
    Examples:
      lineside devices probe                 # this box: CPU, devices, matching profile
      lineside devices list
      lineside run bundle --source 0 --profile intel-n100
    """


@devices.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def devices_list(as_json):
    """The shipped target box profiles and the runtime settings each applies."""
    from lineside.devices.profiles import shipped_profiles

    profiles = shipped_profiles()
    if as_json:
        click.echo(json.dumps([p.to_dict() for p in profiles], indent=2))
        return
    for p in profiles:
        rt = ", ".join(f"{k} {v}" for k, v in p.runtime.items())
        click.echo(f"{p.name:22s} {p.title}\n{'':22s} -> {rt}")


@devices.command("show")
@click.argument("profile")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def devices_show(profile, as_json):
    """Everything a PROFILE (a name, or a .yaml file) says."""
    from lineside.devices.profiles import get_profile

    p = get_profile(profile, what="PROFILE")
    if as_json:
        click.echo(json.dumps(p.to_dict(), indent=2))
        return
    click.echo(f"{p.name}: {p.title}")
    if p.cpu:
        click.echo("cpu: " + ", ".join(f"{k} {v}" for k, v in p.cpu.items()))
    if p.memory_gb:
        click.echo(f"memory: {p.memory_gb:g} GB")
    for a in p.accelerators:
        click.echo(f"accelerator: {a['device']}" + (f" ({a['what']})" if a.get("what") else ""))
    click.echo("runtime settings: " + (", ".join(f"--{k} {v}" for k, v in p.runtime.items()) or "none"))
    if p.notes:
        click.echo(p.notes)


@devices.command("probe")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def devices_probe(as_json):
    """What this box is: CPU and its INT8 instructions, memory, the devices OpenVINO and
    ONNX Runtime see, the shipped profiles that match, and the settings to start from.
    Check them with `lineside bench BUNDLE --profile NAME`."""
    from lineside.devices.probe import matching_profiles, probe_host, recommend

    from lineside.devices.profiles import shipped_profiles

    host, profiles = probe_host(), shipped_profiles()
    host["matching_profiles"] = [p.name for p in matching_profiles(host, profiles)]
    host["recommended"] = recommend(host, profiles)
    if as_json:
        click.echo(json.dumps(host, indent=2))
        return
    click.echo(f"cpu: {host['cpu_model']} ({host['arch']}, {host['cores']} cores), memory "
               f"{host['memory_gb']} GB" + (f", board {host['board']}" if host["board"] else ""))
    click.echo("int8 dot-product instructions: " + (", ".join(host["int8_dot_product"]) or "none"))
    ov = host.get("openvino") or {}
    if "devices" in ov:
        click.echo(f"openvino {ov['version']}: " + ", ".join(f"{d} ({n})" for d, n in ov["devices"].items()))
    else:
        click.echo(f"openvino: not usable ({ov.get('error')})")
    ort = host.get("onnxruntime") or {}
    click.echo(f"onnxruntime {ort['version']}: " + ", ".join(ort["providers"]) if "providers" in ort
               else f"onnxruntime: not usable ({ort.get('error')})")
    rec = host["recommended"]
    click.echo(f"matching profiles: {', '.join(host['matching_profiles']) or 'none'}")
    click.echo(f"start with: {' '.join(f'--{k} {v}' for k, v in rec['runtime'].items())}  ({rec['why']})")


if __name__ == "__main__":  # pragma: no cover
    main()
