"""`lineside eval / predict`: `eval` and `predict`, for a training run or an exported model."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .common import model_options


@click.command("eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("data_dir", metavar="DATA", type=click.Path(path_type=Path))
@model_options
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images with a warning instead of failing.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_cmd(model, data_dir, backend, precision, device, threads, skip_bad, quiet, as_json):
    """Score MODEL on DATA (a folder per class, or a path,label CSV).

    MODEL is a training run folder (or its model.pt), an exported bundle folder,
    or a lone .onnx / .xml file. Reports balanced accuracy (the mean of per-class
    recall, fair when classes are imbalanced), accuracy, per-class
    precision/recall/f1 and the confusion matrix (rows: true class)."""
    from lineside.scoring import evaluate, open_scorer

    from .common import libraries_to_stderr

    with libraries_to_stderr(as_json):
        predict_fn, labels, spec, about = open_scorer(model, backend, precision, device, threads)
        r = evaluate(predict_fn, labels, spec, data_dir, skip_bad=skip_bad, progress=not quiet and not as_json,
                     reject_below=about.get("reject_below"))
    r.update(about)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(f"{r['n']} images: balanced accuracy {r['balanced_accuracy']:.2%}, accuracy {r['accuracy']:.2%} "
               f"({r['backend']}{' on ' + r['device'] if r.get('device') else ''})")
    click.echo(f"{'class':24s} {'precision':>9s} {'recall':>7s} {'f1':>6s} {'n':>5s}")
    for name, c in r["per_class"].items():
        click.echo(f"{name:24s} {c['precision']:9.3f} {c['recall']:7.3f} {c['f1']:6.3f} {c['support']:5d}")
    c = r["confidence"]
    line = f"confidence: expected calibration error {c['expected_calibration_error']:.3f}"
    if "unknown_share" in c:
        line += (f"; the model's --reject-below {c['reject_below']:.2f} would call {c['unknown_share']:.1%} unknown"
                 + (f" ({c['wrong_among_unknown']:.0%} of them wrong)" if c["wrong_among_unknown"] is not None else "")
                 + (f", accuracy of the rest {c['accuracy_of_the_rest']:.2%}" if c["accuracy_of_the_rest"] is not None
                    else ""))
    click.echo(line)
    if r["misclassified"]:
        click.echo(f"{len(r['misclassified'])} misclassified (see --json for the list)")


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per image.")
def predict(model, images, backend, precision, device, threads, as_json):
    """Classify IMAGES (files, or folders of images) with MODEL.

    MODEL is a run folder, a bundle folder or a lone .onnx / .xml file. Prints the
    predicted label, its probability and the probability of every class."""
    from lineside.scoring import open_scorer, predict_paths

    from .common import libraries_to_stderr

    with libraries_to_stderr(as_json):
        predict_fn, labels, spec, _ = open_scorer(model, backend, precision, device, threads)
        results = predict_paths(predict_fn, labels, spec, list(images))
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for r in results:
        probs = "  ".join(f"{k}={v:.3f}" for k, v in sorted(r["probabilities"].items(), key=lambda kv: -kv[1]))
        click.echo(f"{r['path']}: {r['label']} ({r['confidence']:.1%})   {probs}")


# --- study --------------------------------------------------------------------------
