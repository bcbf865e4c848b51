"""`lineside train`: train a classifier on a dataset (one process, or data-parallel under torchrun)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from lineside import runs
from lineside.errors import LinesideError


def _list_backbones(ctx, _param, value):
    if not value or ctx.resilient_parsing:
        return
    from lineside.train.backbones import BACKBONES

    for name in BACKBONES.names():
        entry = BACKBONES.get(name)
        s = entry.input_spec
        click.echo(f"{name:20s} {s.height}x{s.width}  {entry.description}")
    ctx.exit(0)


@click.command()
@click.argument("data_dirs", metavar="DATA...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder to write (model.pt, metrics.json, ...).")
@click.option("--list-backbones", is_flag=True, expose_value=False, is_eager=True, callback=_list_backbones,
              help="List the available backbones and exit.")
@click.option("--task", type=click.Choice(["classify", "anomaly"]), default="classify", show_default=True,
              help="classify: one class per folder. anomaly: learn from good parts alone (the folder good/, "
                   "or --ok-classes) and flag whatever differs from them, with a heatmap; other folders are "
                   "only scored, to report what the threshold catches.")
@click.option("--ok-classes", default=None,
              help="anomaly: the class folder(s) of good parts, comma-separated; with --unlabelled, the one "
                   "good class. [good]")
@click.option("--unlabelled", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A folder of images nobody labelled (sub-folders too, e.g. a run's saved frames): used "
                   "where cross-validation on the labelled images says it helps (a linear head labels and "
                   "refits on them; with a good class, the ones called good become a model of good parts "
                   "the model also measures each part against, or lets decide good or defective). "
                   "metrics.json says what was used and why.")
@click.option("--false-reject", type=click.FloatRange(0.0001, 0.2), default=None,
              help="anomaly and --guard: the share of good parts the threshold may flag, e.g. 0.01 for 1%. It "
                   "is set from good images scored by models that did not see them. [0.01]")
@click.option("--guard", is_flag=True, default=False,
              help="Also train an anomaly model on the good class's images: a part the classifier calls good "
                   "but that differs from every good part is labelled 'anomalous' (NG), so defects nobody "
                   "photographed are caught too. The good class: the folder good, ok, pass, normal, functional, "
                   "no defect or non-defective (any case), or --ok-classes.")
@click.option("--bank", type=int, default=None,
              help="anomaly: most good patches kept in the memory bank (coreset); more is slower. "
                   "[512 beside the Gaussians (--scorer both), 2048 alone]")
@click.option("--scorer", type=click.Choice(["both", "bank", "gaussian"]), default=None,
              help="anomaly: how a patch is judged. bank: its distance to the nearest good patch anywhere "
                   "(parts that move, textures); gaussian: its distance to the good patches seen at the same "
                   "place (parts held in a fixture); both: the two added, each in units of its typical "
                   "good score. [both]")
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
@click.option("--calibrate", type=click.Choice(["auto", "off"]), default=None,
              help="auto: fit a temperature so that confidence means a probability, on the validation images "
                   "or (few images) on out-of-fold predictions of the training images, and choose the "
                   "bundle's default --reject-below from them (calibration.png, metrics.json). [auto]")
@click.option("--time-budget", type=float, default=None,
              help="auto: fine-tune only when its estimated time on this machine (timed on one batch, with its "
                   "out-of-fold calibration) is at most this many seconds; else the linear head (last or middle "
                   "stages) that cross-validated better. 0: no limit. --strategy finetune always fine-tunes. [150]")
@click.option("--val", "val_dir", type=click.Path(path_type=Path), default=None,
              help="Validation folder (instead of a split of DATA).")
@click.option("--val-fraction", type=float, default=None,
              help="Fraction of each class held out for validation. [0.2 when every class has 25+ images, else 0]")
@click.option("--patience", type=int, default=None, help="Early stopping patience in epochs. [6]")
@click.option("--image-size", type=int, default=None, help="Square input size (default: the backbone's).")
@click.option("--seed", type=int, default=None, help="[0]")
@click.option("--threads", type=int, default=None, help="CPU threads for torch.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="auto: CUDA when there is a GPU (the run's metrics.json names the device used). cuda is "
                   "the first GPU PyTorch sees: CUDA_VISIBLE_DEVICES=1 lineside train ... picks another. [auto]")
@click.option("--gpus", "processes", type=int, default=None,
              help="Train data-parallel in this many processes on this machine, one per GPU (without CUDA, "
                   "CPU processes), through torchrun and DistributedDataParallel. --batch-size is per "
                   "process. Several machines: start `torchrun ... -m lineside.cli train ...` on each (README).")
@click.option("--skip-bad", is_flag=True, default=None, help="Skip unreadable images with a warning instead of failing.")
@click.option("--force", is_flag=True, help="Overwrite a run folder that already holds a model.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def train(data_dirs, out, config_file, val_dir, processes, force, quiet, as_json, task, ok_classes, false_reject,
          bank, scorer, unlabelled, guard, **options):
    """Train a classifier on DATA (one sub-folder per class, or a path,label CSV).

    Several DATA are trained on together (e.g. the old images and the frames
    reviewed on the line: `lineside train parts/ review/reviewed/manifest.csv`);
    an image in more than one takes the label of the last. The run folder keeps
    the combined list as data.csv.

    \b
    Examples:
      lineside train parts/ --out runs/parts
      lineside train parts/ --out runs/p2 --strategy linear
      lineside train parts/ --out runs/p3 --backbone resnet18 --weights resnet18.pth --no-rot90
      lineside train parts/ --unlabelled frames/ --out runs/p4

    With --task anomaly it learns from good parts alone (DATA/good, or
    --ok-classes) and flags whatever differs from them; other folders are only
    scored, to report what its threshold catches:

    \b
      lineside train bottle/train --task anomaly --out runs/bottle
      lineside train cells/ --task anomaly --ok-classes functional --false-reject 0.005 --out runs/cells
    """
    _check_task_options(task, ok_classes, false_reject, bank, unlabelled, guard, scorer)
    if task == "anomaly":
        return _train_anomaly(data_dirs, out, force, quiet, as_json, ok_classes, false_reject, bank, scorer,
                              options)
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
        sys.exit(_torchrun(cfg, processes))
    if len(data_dirs) > 1:
        from lineside.dataset import combine_sources

        data_dir = combine_sources(data_dirs, out / runs.DATA_MANIFEST)
    else:
        data_dir = data_dirs[0]
    from .common import libraries_to_stderr

    with libraries_to_stderr(as_json):
        from lineside.train.anomaly import DEFAULT_FALSE_REJECT

        m = train_run(data_dir, out, cfg, val=val_dir, progress=not quiet, unlabelled=unlabelled, ok_classes=ok_classes,
                      guard=(DEFAULT_FALSE_REJECT if false_reject is None else false_reject) if guard else None)
    if not dist.main:
        return
    if as_json:
        click.echo(json.dumps(m, indent=2))
        return
    _print_summary(m, out)


def _check_task_options(task, ok_classes, false_reject, bank, unlabelled, guard, scorer=None) -> None:
    """The options of one task given to the other: a one-line error naming the option."""
    if task == "anomaly":
        for name, given in (("--unlabelled", unlabelled is not None), ("--guard", guard)):
            if given:
                raise LinesideError(f"{name}: only for --task classify (an anomaly model trains on good parts)")
        return
    if ok_classes is not None and unlabelled is None and not guard:
        raise LinesideError("--ok-classes: only for --task anomaly, --guard or --unlabelled")
    if false_reject is not None and not guard:
        raise LinesideError("--false-reject: only for --task anomaly or --guard")
    for name, given in (("--bank", bank), ("--scorer", scorer)):
        if given is not None:
            raise LinesideError(f"{name}: only for --task anomaly")


def _torchrun(cfg, processes: int) -> int:
    """--gpus N: this command again under torchrun, N processes; its exit status."""
    import subprocess
    import tempfile

    import torch

    from lineside.train import distributed

    if cfg.device != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() < processes:
        raise LinesideError(f"--gpus {processes}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    argv = distributed.without_option(sys.argv[1:], "--gpus")
    with tempfile.TemporaryDirectory(prefix="lineside-torchrun-") as logs:   # removed after the run
        return subprocess.run(distributed.torchrun_args(processes, argv, logs)).returncode


def _print_summary(m: dict, out) -> None:
    click.echo(m["strategy_reason"])
    gpu = (m.get("host") or {}).get("gpu")
    where = m["device"] + (f" ({gpu})" if gpu else "") + (f", {m['processes']} processes"
                                                          if m.get("processes", 1) > 1 else "")
    click.echo(f"trained {m['backbone']} ({m['strategy']}) on {sum(m['train_counts'].values())} images "
               f"in {m['seconds']['total']:.0f} s on {where}; {m['split']}")
    if m["plan"]["test_views"]:
        click.echo(f"predictions average {len(m['plan']['test_views'])} flipped/turned views of each image "
                   f"(--tta off for one pass)")
    if m["validation"]:
        v = m["validation"]
        click.echo(f"validation: balanced accuracy {v['balanced_accuracy']:.1%}, accuracy {v['accuracy']:.1%} "
                   f"on {v['n']} images")
    g = m.get("guard")
    if g:
        lo, hi = g["false_reject_expected"]["interval_90"]
        click.echo(f"guard: an anomaly model of the {g['good_images']} {g['good_class']} image(s), its threshold "
                   f"at {g['false_reject_target']:.1%} false rejects ({lo:.1%}-{hi:.1%} expected, 90% interval); "
                   f"a part it flags is labelled 'anomalous'")
    for step in (m.get("unlabelled") or {}).get("steps", []):
        click.echo(f"unlabelled images, {step['method']}: {step['why']}")
    c = m.get("calibration")
    if c:
        click.echo(calibration_line(c))
    click.echo(f"wrote {out}/model.pt, metrics.json, history.csv, confusion_matrix.png, "
               + ("calibration.png, " if c else "") + "config.yaml")


ANOMALY_OPTIONS = {"backbone", "weights", "taps", "image_size", "seed", "device", "skip_bad", "threads"}


def _train_anomaly(data_dirs, out, force, quiet, as_json, ok_classes, false_reject, bank, scorer, options):
    from lineside.train import anomaly as A
    from lineside.train.anomaly_run import train_anomaly_run
    from lineside.train.run import check_out_dir

    given = sorted(k for k, v in options.items() if v is not None and k not in ANOMALY_OPTIONS)
    if given:
        raise LinesideError(f"--task anomaly: --{given[0].replace('_', '-')} is for classifiers only")
    if len(data_dirs) > 1:
        raise LinesideError("--task anomaly: give one DATA folder")
    check_out_dir(out, force)
    taps = A.DEFAULT_TAPS
    if options.get("taps"):
        try:
            taps = tuple(int(t) for t in options["taps"].split(","))
        except ValueError:
            raise LinesideError(f"--taps: '{options['taps']}' is not stage numbers such as 3,5") from None
    if bank is not None and not 16 <= bank <= 65536:
        raise LinesideError(f"--bank: {bank} is outside 16..65536")
    if options.get("threads"):
        import torch

        torch.set_num_threads(options["threads"])
    from .common import libraries_to_stderr

    with libraries_to_stderr(as_json):
        m = train_anomaly_run(
            data_dirs[0], out, ok_classes=ok_classes,
            false_reject=A.DEFAULT_FALSE_REJECT if false_reject is None else false_reject,
            image_size=options.get("image_size"), bank=bank, taps=taps,
            scorer=scorer or A.DEFAULT_SCORER, backbone=options.get("backbone") or "efficientnet_lite0",
            weights=options.get("weights") or "imagenet",
            seed=options.get("seed") or 0, device=options.get("device") or "auto",
            skip_bad=bool(options.get("skip_bad")), progress=not quiet and not as_json)
    if as_json:
        click.echo(json.dumps(m, indent=2))
        return
    a = m["anomaly"]
    e = a["false_reject_expected"]
    spec = m["input_spec"]
    click.echo(f"{m['strategy_reason']}; input {spec['height']}x{spec['width']}; {m['seconds']['total']:.0f} s "
               f"on {m['device']}")
    click.echo(f"threshold {a['threshold']:.4g}: flags {a['false_reject_target']:.2%} of good parts "
               f"(90% interval {e['interval_90'][0]:.2%} to {e['interval_90'][1]:.2%} with "
               f"{m['train_counts']['good']} good images); {e['out_of_fold_above']} of "
               f"{e['out_of_fold_images']} good images scored out of fold are above it")
    d = m["defects"]
    if d:
        click.echo(f"other classes: {d['detected']} of {d['images']} flagged ({d['detection_rate']:.1%}), "
                   f"AUROC {d['auroc']:.1f} against the good images; "
                   + ", ".join(f"{k} {v['detected']}/{v['images']}" for k, v in d["per_class"].items()))
    click.echo(f"wrote {out}/model.pt, metrics.json, scores.png, scores.npz")


def calibration_line(c: dict) -> str:
    """The summary's line on a run's calibration (metrics.json "calibration"). Where the
    fitted temperature left the model surer than its held-out answers vouch for (always so
    when every one was right), it was raised to that ceiling (cap_temperature), and an
    expected calibration error that grows is the ceiling's doing: the line says so."""
    capped = c.get("confidence_ceiling")
    return (f"calibrated on {c['source']}: temperature {c['temperature']:.2f}"
            + (f" (raised: {c['right']} of {c['images']} right answers vouch for a mean confidence "
               f"of at most {capped:.1%})" if capped else "")
            + f", expected calibration error {c['ece_before']:.3f} -> {c['ece_after']:.3f}"
            + (f"; default --reject-below {c['reject_below']:.2f} (keeps 99% of the right answers)"
               if c["reject_below"] is not None else ""))
