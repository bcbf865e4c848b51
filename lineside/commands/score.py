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
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write figures to this folder: the confusion matrix (PNG) and the misclassified images, or "
                   "for an anomaly model heatmaps of the worst good parts and the missed defects; index.html "
                   "shows them, report.json holds the report.")
def eval_cmd(model, data_dir, backend, precision, device, threads, skip_bad, quiet, as_json, out):
    """Score MODEL on DATA (a folder per class, or a path,label CSV).

    MODEL is a training run folder (or its model.pt), an exported bundle folder,
    or a lone .onnx / .xml file. Reports balanced accuracy (the mean of per-class
    recall, fair when classes are imbalanced), accuracy, per-class
    precision/recall/f1 and the confusion matrix (rows: true class).

    An anomaly model (lineside train --task anomaly) is scored on its good class(es)
    against every other folder, whatever the defects are called: AUROC, the share of
    good parts flagged (false reject) and of the others caught, per folder.

    \b
      lineside eval runs/parts test-parts/ --out review/        # + confusion matrix, wrong images
      lineside eval runs/bottle bottle/test --out review/       # anomaly: + heatmaps of the worst"""
    from lineside.scoring import evaluate, evaluate_anomaly

    from .common import libraries_to_stderr
    from .scorer import open_scorer

    with libraries_to_stderr(as_json):
        predict_fn, labels, spec, about = open_scorer(model, backend, precision, device, threads)
        anomaly = about.pop("anomaly", None)
        if anomaly is not None:
            r = evaluate_anomaly(anomaly, spec, data_dir, skip_bad=skip_bad, progress=not quiet and not as_json,
                                 out=out)
        else:
            r = evaluate(predict_fn, labels, spec, data_dir, skip_bad=skip_bad, progress=not quiet and not as_json,
                         reject_below=about.get("reject_below"), out=out)
    r.update(about)
    if anomaly is not None:
        return _print_anomaly_eval(r, as_json)
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
    if r.get("out"):
        click.echo(f"wrote confusion_matrix.png, {len(r['out']['files']) - 3} misclassified images and index.html "
                   f"to {r['out']['folder']}")


def _print_anomaly_eval(r: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    pct = lambda v: "-" if v is None else f"{v:.1%}"   # noqa: E731
    auc = "-" if r["auroc"] is None else f"{r['auroc']:.1f}"
    click.echo(f"{r['n']} images: AUROC {auc}; at threshold {r['threshold']:.4g}: {pct(r['false_reject'])} of "
               f"{r['good_images']} good flagged (false reject), {pct(r['detection'])} of {r['other_images']} "
               f"others caught ({r['backend']}{' on ' + r['device'] if r.get('device') else ''})")
    click.echo(f"{'folder':24s} {'images':>6s} {'flagged':>7s} {'median score':>12s}")
    for name, c in r["per_class"].items():
        click.echo(f"{name + (' (good)' if c['good'] else ''):24s} {c['images']:6d} {c['flagged']:7d} "
                   f"{c['score_median']:12.4g}")
    if r.get("out"):
        click.echo(f"wrote {len(r['out']['files']) - 2} overlays and index.html to {r['out']['folder']}")


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per image.")
@click.option("--overlays", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Anomaly models: write each image's heatmap overlay (PNG) to this folder.")
def predict(model, images, backend, precision, device, threads, as_json, overlays):
    """Classify IMAGES (files, or folders of images) with MODEL.

    MODEL is a run folder, a bundle folder or a lone .onnx / .xml file. Prints the
    predicted label, its probability and the probability of every class; for an
    anomaly model, good or anomalous, its score and the score relative to the
    threshold (above 1.0 is anomalous), and with --overlays a heatmap per image."""
    from lineside.errors import LinesideError
    from lineside.scoring import predict_anomaly, predict_paths

    from .common import libraries_to_stderr
    from .scorer import open_scorer

    with libraries_to_stderr(as_json):
        predict_fn, labels, spec, about = open_scorer(model, backend, precision, device, threads)
        anomaly = about.get("anomaly")
        if anomaly is None and overlays is not None:
            raise LinesideError("--overlays: only for anomaly models (lineside train --task anomaly)")
        if anomaly is not None:
            results = predict_anomaly(anomaly, spec, list(images), overlays)
            if as_json:
                click.echo(json.dumps(results, indent=2))
                return
            for r in results:
                click.echo(f"{r['path']}: {r['label']} (score {r['score']:.4g}, {r['relative']:.2f}x the threshold)"
                           + (f"  -> {r['overlay']}" if r.get("overlay") else ""))
            return
        results = predict_paths(predict_fn, labels, spec, list(images))
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for r in results:
        probs = "  ".join(f"{k}={v:.3f}" for k, v in sorted(r["probabilities"].items(), key=lambda kv: -kv[1]))
        click.echo(f"{r['path']}: {r['label']} ({r['confidence']:.1%})   {probs}")


# --- study --------------------------------------------------------------------------
