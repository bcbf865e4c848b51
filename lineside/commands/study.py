"""`lineside study`: sample-size, compare and cv studies before a project."""

from __future__ import annotations

import json
from pathlib import Path

import click


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


@click.group()
def study():
    """Plan a project: how many images per class, which recipe, and cross-validation.

    \b
      lineside study sample-size DATA --target 0.99     # images per class for a target
      lineside study compare DATA --shots 10            # linear vs finetune vs full vs scratch
      lineside study cv DATA --folds 5                  # k-fold scores, confusions, suspicious labels
      lineside study next RUN FOLDER --count 20         # which unlabelled images to label next
    """


@study.command("sample-size")
@click.argument("data_dir", metavar="DATA", type=click.Path(path_type=Path))
@click.option("--task", type=click.Choice(["classify", "anomaly"]), default="classify", show_default=True,
              help="anomaly: how many good parts an anomaly model needs (AUROC and false rejects).")
@click.option("--shots", default=None, help="Training images per class to try (anomaly: good images). "
              "[1,2,5,10,20,50; anomaly: 4,8,16,32,64]")
@click.option("--repeats", default=5, show_default=True, help="Random draws per size.")
@click.option("--strategy", type=click.Choice(["auto", "linear", "finetune", "full", "scratch"]), default="auto",
              show_default=True, help="Recipe to study (linear is by far the fastest: features are shared).")
@click.option("--target", default=0.99, show_default=True, help="Balanced accuracy (anomaly: AUROC) to reach (0..1).")
@click.option("--ok-classes", default=None, help="anomaly: the good class folder(s). [good]")
@click.option("--false-reject", type=click.FloatRange(0.0001, 0.2), default=None, help="anomaly: the share of good parts the threshold "
              "may flag. [0.01]")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("study-sample-size"),
              show_default=True)
@_study_options
def study_sample_size(data_dir, task, shots, repeats, strategy, target, ok_classes, false_reject, out, config_file,
                      as_json, quiet, views, **options):
    """How many images per class does DATA need to reach --target?

    For each size, draws that many training images per class (seeded, --repeats
    times), trains, and scores on every image not drawn. Fits a learning curve
    (inverse power law), estimates the size for the target with an 80% interval,
    and says so plainly when the data cannot support an estimate. Writes
    learning_curve.png, sample_size.json and report.md (with per-class curves).

    Every finished fit is kept in OUT/fits.jsonl as it ends: after Ctrl-C the
    same command carries on where it stopped.

    With --task anomaly: how many good parts? Models fitted on 4, 8, 16... good
    images (DATA/good, or --ok-classes) are scored on every image not drawn: the
    false-reject rate on the good ones against the rate promised, and the AUROC
    and detection rate on the other folders.

    \b
      lineside study sample-size bottle/ --task anomaly --repeats 3"""
    from lineside.train.study import sample_size

    if not 0 < target < 1:
        raise click.BadParameter("must be between 0 and 1 (0.99 means 99%)", param_hint="--target")
    if repeats < 1:
        raise click.BadParameter("must be at least 1", param_hint="--repeats")
    if task == "anomaly":
        return _anomaly_sample_size(data_dir, shots, repeats, target, ok_classes, false_reject, out, as_json, quiet,
                                    options)
    for name, value in (("--ok-classes", ok_classes), ("--false-reject", false_reject)):
        if value is not None:
            raise click.UsageError(f"{name}: only with --task anomaly")
    cfg = _study_config(config_file, strategy=strategy, **options)
    r = sample_size(data_dir, out, cfg, shots=_ints(shots or "1,2,5,10,20,50", "--shots"), repeats=repeats,
                    target=target, views=views, progress=not quiet and not as_json)
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


def _anomaly_sample_size(data_dir, shots, repeats, target, ok_classes, false_reject, out, as_json, quiet, options):
    from lineside.train import anomaly as A
    from lineside.train.anomaly_study import ANOMALY_SHOTS, anomaly_sample_size

    r = anomaly_sample_size(data_dir, out, shots=_ints(shots, "--shots") if shots else ANOMALY_SHOTS,
                            repeats=repeats, target=target, ok_classes=ok_classes,
                            false_reject=A.DEFAULT_FALSE_REJECT if false_reject is None else false_reject,
                            image_size=options.get("image_size"), skip_bad=bool(options.get("skip_bad")),
                            progress=not quiet and not as_json)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    for s in r["sizes"]:
        auc = "" if s["auroc_mean"] is None else f"AUROC {s['auroc_mean']:.1f} ± {s['auroc_std']:.1f}, "
        click.echo(f"{s['shots']:>4} good images: {auc}good parts flagged {s['false_reject_mean']:.1%} "
                   f"(promised {r['false_reject_promised']:.1%})")
    if r["estimate"]:
        click.echo(f"estimate for AUROC {100 * target:.1f}: {r['estimate']['statement']}")
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


@study.command("next")
@click.argument("run_dir", metavar="RUN", type=click.Path(path_type=Path, exists=True))
@click.argument("folder", metavar="FOLDER", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--count", default=20, show_default=True, help="Images to put in the queue.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("study-next"),
              show_default=True, help="Where the queue goes (queue.sqlite, frames/, queue.csv).")
@click.option("--json", "as_json", is_flag=True, help="Print the queue as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def study_next(run_dir, folder, count, out, as_json, quiet):
    """Which of the images in FOLDER (not labelled yet) to label next for the model of RUN.

    The images the model is least sure of, spread over what they show (not twenty
    copies of one hard case, nor images like those already labelled), first to label
    first. The queue opens in the review page; the frames labelled there go to
    OUT/frames/reviewed/, which the next training reads:

    \b
      lineside study next runs/parts frames/ --count 20 --out next/
      lineside review next/queue.sqlite --save next/frames --http-token-file token.txt
      lineside train parts/ next/frames/reviewed/manifest.csv --out runs/parts2"""
    from lineside.errors import LinesideError
    from lineside.runs import RunFolder
    from lineside.train.checkpoint import load_checkpoint, resolve_checkpoint
    from lineside.train.next import rank_for_labelling, write_queue
    from lineside.train.unlabelled import read_unlabelled

    if count < 1:
        raise LinesideError(f"--count: {count} is not a number of images (1 or more)")
    loaded = load_checkpoint(run_dir)
    if getattr(loaded.model, "task", None) == "anomaly":
        raise LinesideError(f"{run_dir}: an anomaly model; study next ranks images for a classifier")
    x, paths, info = read_unlabelled(folder, loaded.spec, 0, not quiet and not as_json)
    x_lab = _labelled_images(RunFolder.at(run_dir).data(), loaded.spec, not quiet and not as_json)
    ranked = rank_for_labelling(loaded.model, x, x_lab, min(count, len(x)))
    from lineside.files import sha256

    written = write_queue(ranked, paths, loaded.labels, out, sha256(resolve_checkpoint(run_dir)))
    r = {**info, **written, "candidates": ranked["candidates"],
         "queue": [{"rank": n + 1, "path": str(paths[i]), "predicted": loaded.labels[p], "confidence": c, "margin": m}
                   for n, (i, p, c, m) in enumerate(zip(ranked["indices"], ranked["predicted"],
                                                         ranked["confidence"], ranked["margin"]))]}
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(f"{written['queued']} of {info['used']} unlabelled image(s) queued, the least certain of "
               f"{ranked['candidates']} candidates spread over what they show:")
    for q in r["queue"][:10]:
        click.echo(f"  {q['rank']:>3}. {q['path']}: {q['predicted']} ({q['confidence']:.0%}, margin {q['margin']:.2f})")
    click.echo(f"wrote {written['csv']} and {written['log']}; label them with\n"
               f"  lineside review {written['log']} --save {written['frames']} --http-token-file TOKEN")


def _labelled_images(data, spec, progress: bool):
    """The run's training images at the model's size (empty when the run no longer finds them)."""
    import numpy as np

    from lineside.dataset import load_arrays, load_image_set
    from lineside.errors import LinesideError

    try:
        images = load_image_set(data) if data else None
        if images is not None:
            return load_arrays(images, spec, skip_bad=True, progress=progress, desc="reading labelled images")[0]
    except LinesideError:
        pass
    return np.zeros((0, spec.height, spec.width, 3), np.uint8)


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
