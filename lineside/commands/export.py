"""`lineside export`: a training run to an ONNX / OpenVINO bundle, INT8 behind the accuracy gate."""

from __future__ import annotations

import json
from pathlib import Path

import click

from lineside.bundles import BUNDLE_JSON, EXPORT_REPORT_JSON, EXPORT_REPORT_MD, MODEL_API_FILE, SIGNATURE_JSON


@click.command()
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
              help="Labelled held-out images on which FP32 and INT8 are compared. Without it, INT8 is "
                   "judged on the run's validation images (and augmented copies); else on what it is "
                   "estimated to do to unseen images (the run's out-of-fold predictions, and the label "
                   "margins INT8 moves on training images held out of calibration); else a head on frozen "
                   "features is judged on those held-out images directly, and a fine-tuned run gets no INT8.")
@click.option("--max-drop", type=float, default=0.3, show_default=True,
              help="Largest loss of balanced accuracy (percentage points) an INT8 model may have.")
@click.option("--min-agreement", type=float, default=99.5, show_default=True,
              help="Smallest share of evaluation images (percent) on which INT8 must give FP32's label "
                   "(a linear head judged out of fold, without --eval, is held to --max-drop only).")
@click.option("--speed-seconds", default=1.0, show_default=True,
              help="Seconds to time each model's latency and throughput for the report (0: skip).")
@click.option("--tta", type=click.Choice(["keep", "off"]), default="keep", show_default=True,
              help="A model trained with test-time views (lineside train --tta) runs 4 flipped/turned "
                   "copies of each image; off exports one pass per image: 4-5x faster, a little "
                   "less accurate (compare with --eval).")
@click.option("--force", is_flag=True, help="Replace a bundle already in --out (its files are removed first).")
@click.option("--sign", "sign_key", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Sign the bundle with this Ed25519 private key (lineside keys new): signature.json covers "
                   "every file's SHA-256, so `lineside run --trust KEY.pub` refuses any change. Needs "
                   "lineside[signing].")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print bundle.json and the report as one JSON object.")
def export(run, out, formats, data_dir, int8, calib, eval_dir, max_drop, min_agreement, speed_seconds, tta, force,
           sign_key, quiet, as_json):
    """Export a training RUN to a bundle of ONNX / OpenVINO models (FP32, and INT8 that passed its gate).

    The models take uint8 RGB images (N, H, W, 3) at the size in their metadata
    and return class probabilities: normalisation and softmax are inside the
    graph. Labels, input spec and provenance are stored inside each model file
    and in bundle.json, with a sha256 of every file. Every export checks that
    ONNX Runtime and OpenVINO agree with PyTorch (max probability difference
    <= 1e-4) and fails if they do not."""
    from lineside.export.bundle import export_bundle

    if sign_key is not None:      # a bad key fails now, not after minutes of export
        from lineside.signing import load_private_key

        load_private_key(sign_key)
    from .common import libraries_to_stderr

    with libraries_to_stderr(as_json):
        result = export_bundle(run, out, formats=[f.strip() for f in formats.split(",") if f.strip()],
                               data=data_dir, int8=int8, calib=calib, eval_data=eval_dir, max_drop=max_drop,
                               min_agreement=min_agreement, progress=not quiet and not as_json,
                               speed_seconds=speed_seconds, tta=tta == "keep", force=force)
    if sign_key is not None:
        from lineside.signing import sign_bundle

        result["signature"] = sign_bundle(out, sign_key)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    parity = result["report"]["parity"]
    for name, r in parity["results"].items():
        click.echo(f"parity {name}: max |p - p_torch| = {r['max_abs_diff']:.1e}, "
                   f"top-1 agreement {r['top1_agreement']:.1%} ({parity['images']})")
    _print_int8(result["report"].get("int8", {}), out)
    for key, r in result["report"]["models"].items():
        speed = (f", {r['latency_ms']:.2f} ms per image, {r['throughput_fps']:.0f} FPS" if "latency_ms" in r else "")
        extra = f" ({r['speedup_vs_fp32']:.2f}x FP32)" if "speedup_vs_fp32" in r else ""
        click.echo(f"{key}: {r['bytes'] / 2**20:.1f} MiB{speed}{extra}")
    if result["report"].get("model_api"):
        click.echo(f"{MODEL_API_FILE}: the anomaly model for OpenVINO Model API's AnomalyDetection")
    click.echo(f"wrote {out}/{BUNDLE_JSON}, {EXPORT_REPORT_JSON}, {EXPORT_REPORT_MD}"
               + (f", {SIGNATURE_JSON} (key {result['signature']['key_id']})" if sign_key is not None else ""))


def _print_int8(int8: dict, out) -> None:
    """What the INT8 gate decided, runtime by runtime."""
    from lineside.export.bundle import judged_on

    for runtime, q in int8.items():
        if q["verdict"] == "kept" and "estimated" in q["gate"]:
            g = q["gate"]
            click.echo(f"INT8 {runtime} kept ({q['recipe']}): estimated drop {g['drop_points']:.2f} points of balanced "
                       f"accuracy (limit {g['max_drop_points']}), top-1 agreement with FP32 {g['top1_agreement']:.1%} "
                       f"(at least {g['min_agreement']:g}%) on {judged_on(q)}")
        elif q["verdict"] == "kept":
            g = q["gate"]
            click.echo(f"INT8 {runtime} kept ({q['recipe']}): balanced accuracy {g['int8_balanced_accuracy']:.2%} vs "
                       f"FP32 {g['fp32_balanced_accuracy']:.2%} (drop {g['drop_points']:.2f} points, limit "
                       f"{g['max_drop_points']}), top-1 agreement {g['top1_agreement']:.1%} on {judged_on(q)}")
        elif q["verdict"] == "refused" and "gate" in q:
            click.echo(f"INT8 {runtime} refused, FP32 kept:")
            for reason in q.get("reasons") or [q["why"]]:
                click.echo(f"  - {reason}")
            click.echo(f"  judged on {judged_on(q)}; {len(q['attempts'])} recipe(s) tried "
                       f"({', '.join(a['recipe'] for a in q['attempts'])}); details in {out}/{EXPORT_REPORT_MD}")
            if q.get("next"):
                click.echo(f"  next: {q['next']}")
        else:
            click.echo(f"INT8 {runtime} {q['verdict']}: {q['why']}")
