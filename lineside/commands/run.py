"""`lineside run`: `run` (the camera loop on the line) and `bench` (its speed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import click

from .common import model_options


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
    return model_options(f)


def _open_runtime_model(bundle, backend, precision, device, threads, trusted=None):
    from lineside.runtime.model import open_checked

    return open_checked(bundle, trusted, backend=backend, precision=precision, device=device, threads=threads)


@click.command("run")
@click.argument("bundle", type=click.Path(path_type=Path), required=False)
@_runtime_options
@click.option("--products", "products_file", default=None, type=click.Path(path_type=Path, dir_okay=False),
              help="Instead of BUNDLE: a YAML file naming a bundle per product, each with its roi, ok_classes, "
                   "reject_below and vote; the line switches between them between two frames (Modbus "
                   "ProductRequest, MQTT PREFIX/product, POST /api/product). README: 'Product changeover'.")
@click.option("--product", default=None, metavar="NAME|INDEX",
              help="With --products: the product active at the start. [the first]")
@click.option("--updates", default=None, metavar="DIR",
              help="Watch DIR for new bundles (a folder with bundle.json, copied in whole): each is checked "
                   "(with --trust, its signature), given the running model's ROI, OK classes, threshold and "
                   "vote, and takes over between two frames; one that fails is refused with an event and the "
                   "old model stays.")
@click.option("--shadow", default=None, metavar="BUNDLE",
              help="A candidate bundle decided beside the line on the frames it has time for (its own thread; "
                   "the line never waits), logged but sent nowhere; lineside compare LOG shows where they "
                   "disagree; POST /api/shadow/promote and /api/rollback (with the page's token) switch.")
@click.option("--drift/--no-drift", default=True, show_default=True,
              help="Drift alarms: compare the last --drift-window frames' brightness, contrast (and, where "
                   "the bundle has it, confidence) with the training images' (a drift event, never a stop).")
@click.option("--drift-window", type=int, default=300, show_default=True,
              help="Frames in the rolling window that drift alarms compare with training.")
@click.option("--trust", default=None, metavar="PUB[,PUB...]",
              help="Run only bundles signed by one of these public keys (lineside keys new, export --sign): "
                   "an unsigned bundle, an unknown key, or any file changed, added or removed since signing "
                   "is refused with one line naming it. [any bundle; the log says whether it was signed]")
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
@click.option("--log-keep-days", type=float, default=None, metavar="DAYS",
              help="Delete the SQLite log's decisions, events and shadow rows older than DAYS, at the start "
                   "and every 10 minutes (a log_pruned event says how many): at 30 FPS a log of five classes "
                   "grows by about 0.7 GB a day, and a full disk would cost decisions. [keep everything]")
@click.option("--save", "save_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the frames worth a look (JPEG, named lineside_*.jpg). Only those files are "
                   "ever deleted by the caps below; a frame that cannot be saved is a save_failed event, "
                   "never a lost decision.")
@click.option("--save-when", default="ng,unknown", show_default=True,
              help="Which frames to save: comma-separated from ng, unknown, flagged, all, and worth: the frames "
                   "worth labelling next (unknowns, frames near the decision, shadow disagreements and a few "
                   "confident ones at random), at most --capture-per-hour; the review page lists them first.")
@click.option("--capture-per-hour", default=120, show_default=True,
              help="With --save-when worth: at most this many frames kept for labelling in any hour.")
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
                   "status. Anonymous clients read and subscribe only; no encryption unless --opcua-cert.")
@click.option("--opcua-user", default=None,
              help="The user who may call Trigger(PartId) over OPC UA; the password comes from "
                   "LINESIDE_OPCUA_PASSWORD. Without it, nobody may write or call.")
@click.option("--opcua-cert", default=None, metavar="FILE",
              help="The OPC UA server's certificate (DER or PEM): the endpoint then offers only Basic256Sha256 "
                   "(sign and encrypt, or sign); needs --opcua-key.")
@click.option("--opcua-key", default=None, metavar="FILE", help="The private key (PEM) of --opcua-cert.")
@click.option("--modbus", default=None, metavar="[HOST:]PORT",
              help="A Modbus TCP server for the PLC (needs lineside[modbus]): status, the trigger handshake "
                   "(Trigger, Ready, ResultsReady, ResultsAck), the result, counters and the product index, "
                   "in register map version 1 (README, 'The PLC handshake over Modbus TCP'; "
                   "python -m lineside.runtime.modbus prints it). Loopback unless HOST is given.")
@click.option("--modbus-allow", default=None, metavar="ADDR[,NET...]",
              help="Only these client addresses or networks (10.0.0.5,10.0.1.0/24) may connect to --modbus. "
                   "[any client]")
@click.option("--trigger", type=click.Choice(["stdin", "mqtt", "opcua", "modbus"]), default=None,
              help="Answer triggered parts: each line on stdin (its text, if any, is the part id), each "
                   "message on PREFIX/trigger, each OPC UA Trigger(PartId) call, or the Modbus Trigger "
                   "register asks for the decision on the next frame (with --vote N/M, the next M frames). "
                   "The answer (part id, label, OK/NG, reason) goes to stdout as a JSON line (stdin), "
                   "PREFIX/answer (MQTT), LastAnswer (OPC UA), the result registers (Modbus) and the log. "
                   "Needs --ok-classes. [free-running]")
@click.option("--trigger-timeout", "trigger_timeout_ms", default=1000.0, show_default=True,
              help="Milliseconds within which a triggered part gets its answer; when none is ready, the "
                   "answer is NG with reason no_frame (no frame came) or timeout (fail safe).")
@click.option("--http", default=None, metavar="[HOST:]PORT",
              help="Serve a status page for a box without a screen: live counts, FPS, latency, the last "
                   "frame and events at /, the same as JSON at /api/status, Prometheus metrics at /metrics; "
                   "with a SQLite --log and --save, the saved frames to review at /review. Loopback unless "
                   "HOST is given (0.0.0.0: the plant network).")
@click.option("--http-token-file", default=None, metavar="FILE",
              help="A file whose first line is the token that relabelling frames on the review page needs "
                   "(or LINESIDE_HTTP_TOKEN). Without one the page is read only.")
@click.option("--http-host", "http_hosts", multiple=True, metavar="NAME",
              help="A DNS name the page is reached by (repeatable). Requests must name the page by an IP "
                   "address, localhost, this machine's name or one of these, so that no web page can reach "
                   "it under a name of its own (DNS rebinding).")
@click.option("--review-out", type=click.Path(path_type=Path), default=None,
              help="Where reviewed frames go: a folder per label and manifest.csv. [SAVE/reviewed]")
@click.option("--display", is_flag=True, help="Show frames with label, confidence, OK/NG and FPS (needs a screen).")
@click.option("--quiet", is_flag=True, help="No live status line.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def run_cmd(**params):
    """Classify every frame from --source with an exported BUNDLE and record each decision.

    \b
    Examples:
      lineside run bundle --source 0 --ok-classes ok --reject-below 0.8
      lineside run bundle --source rtsp://10.0.0.7/stream --roi 100,40,400,400
      lineside run bundle --source parts.mp4 --pace 30 --log shift.sqlite
      lineside run bundle --source 0 --save review/ --http 0.0.0.0:8080

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
      4  decisions were made that are not in the log as rows (the summary's not_logged,
         and unwritable_rows: kept only as row_unwritable events)"""
    from lineside.runtime.app import RunOptions, run_app

    _check_run_params(params)
    p = SimpleNamespace(**params)
    options = RunOptions.from_params(params)
    load_bundle, products = _bundles(p)
    summary = run_app(None if products else load_bundle(p.bundle), options, products=products,
                      load_bundle=load_bundle)
    if p.as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_run_summary(summary, p.vote)
    code = summary["exit_code"]
    if code == 3:
        click.echo(f"error: --source {summary['source']}: " + (
            f"no frame for {p.source_timeout:g} s (--source-timeout)" if summary.get("source_timeout")
            else "no frame was ever received (see the source_unavailable events in the log)"), err=True)
    elif code == 4:
        click.echo(f"error: {summary['not_logged'] + summary.get('unwritable_rows', 0)} decisions are not in the "
                   f"log {summary['log']} as rows (see the log_unwritable and row_unwritable events)", err=True)
    if code:
        sys.exit(code)


def _check_run_params(params: dict) -> None:
    """What click cannot say of `lineside run`'s options by itself."""
    if params["source"] is None:
        raise click.UsageError("--source is required (a camera index, file, folder, URL or pipeline)")
    if (params["bundle"] is None) == (params["products_file"] is None):
        raise click.UsageError("give either BUNDLE or --products FILE (one bundle per product)")
    for name in ("roi", "reject_below", "ok_classes", "vote"):
        if params["products_file"] is not None and params[name] is not None:
            raise click.UsageError(f"--{name.replace('_', '-')}: with --products, each product sets its own "
                                   "(in the products file)")


def _bundles(p):
    """(how to open a bundle with the run's backend and trusted keys, the products of
    --products or None)."""
    from functools import partial

    from lineside.runtime.model import open_checked

    trusted = None
    if p.trust is not None:
        from lineside.signing import load_public_keys

        trusted = load_public_keys(p.trust)
    load_bundle = partial(open_checked, trusted=trusted, backend=p.backend, precision=p.precision, device=p.device,
                          threads=p.threads)
    if p.products_file is None:
        return load_bundle, None
    from lineside.runtime.app import make_decider
    from lineside.runtime.products import open_products

    return load_bundle, open_products(p.products_file, p.backend, p.precision, p.device, p.threads,
                                      partial(open_checked, trusted=trusted), make_decider)


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


@click.command("bench")
@click.argument("bundle", type=click.Path(path_type=Path))
@_runtime_options
@click.option("--roi", default=None, help="x,y,w,h: classify only this region of each frame, as `lineside run` does.")
@click.option("--seconds", default=10.0, show_default=True, help="Seconds for each of the three measurements.")
@click.option("--http", default=None, metavar="[HOST:]PORT",
              help="Also serve the status page (as `lineside run --http`) and read it as an open browser "
                   "does (status and last frame every second, /metrics every 5 s): its cost on the loop.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench_cmd(bundle, source, pace, hint, backend, precision, device, threads, roi, seconds, http, as_json):
    """Measure the real camera loop on BUNDLE, and in the same run a naive loop and the raw backend.

    Without --source, a short video of drawn parts is made in a temporary folder.
    Reports end-to-end FPS, per-stage latency (capture, preprocess, infer,
    postprocess, record) with p50/p95/p99, capture-to-decision latency, dropped
    frames and peak RSS. With --pace the file is replayed at camera rate, which
    is how latency on the line is measured."""
    from lineside.runtime.bench import bench

    model = _open_runtime_model(bundle, backend, precision, device, threads)
    r = bench(model, source, seconds=seconds, pace=pace, hint=hint, roi=roi, http=http)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    lat = r["latency_ms"]
    click.echo(f"{r['backend']} {Path(r['model']).name} ({r['engine']['hint']}, {r['engine']['requests']} requests), "
               f"source: {r['source']}" + (f" paced at {r['pace']:g} FPS" if r["pace"] else ""))
    click.echo(f"pipeline: {r['fps']:.1f} FPS, capture-to-decision p50 {lat.get('p50', 0):.2f} ms "
               f"p99 {lat.get('p99', 0):.2f} ms, dropped {r['dropped']}, peak RSS {r['rss_mb']:.0f} MB")
    if "http" in r:
        click.echo(f"status page served on {r['http']['url']}, read {r['http']['page_reads']} times meanwhile")
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


@click.command("review")
@click.argument("log_path", metavar="LOG", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--save", "save_dir", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="The --save folder of the run.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Where reviewed frames go: a folder per label (the ROI crop the model saw) and "
                   "manifest.csv (path,label). [SAVE/reviewed]")
@click.option("--http", default="127.0.0.1:8080", show_default=True, metavar="[HOST:]PORT",
              help="Where to serve the review page (0.0.0.0:PORT: the plant network).")
@click.option("--http-token-file", default=None, metavar="FILE",
              help="A file whose first line is the token relabelling needs (or LINESIDE_HTTP_TOKEN); "
                   "without one the page is read only.")
@click.option("--http-host", "http_hosts", multiple=True, metavar="NAME",
              help="A DNS name the page is reached by (repeatable). Requests must name the page by an IP "
                   "address, localhost, this machine's name or one of these, so that no web page can reach "
                   "it under a name of its own (DNS rebinding).")
@click.option("--seconds", type=float, default=None, help="Stop serving after this many seconds. [until Ctrl-C]")
def review_cmd(log_path, save_dir, out_dir, http, http_token_file, http_hosts, seconds):
    """Review the frames a run saved: LOG (the run's SQLite --log) and its --save folder.

    \b
    The page lists the saved NG / unknown / flagged frames with their decision,
    newest first, filterable by label and verdict. Give each its true label (one
    of the model's, or a new class name) and it is written, cropped to the run's
    --roi, into OUT/<label>/ and OUT/manifest.csv, which `lineside train` reads:
      lineside review decisions.sqlite --save review/ --http-token-file token.txt
      lineside train data/ review/reviewed/manifest.csv --out run2"""
    import time

    from lineside.runtime.review import ReviewStore
    from lineside.runtime.web import StatusServer, read_token

    store = ReviewStore(log_path, save_dir, out_dir)
    server = StatusServer(http, None, store, read_token(http_token_file), hosts=http_hosts).start()
    click.echo(f"review page: {server.url}review  (frames from {save_dir}, reviewed frames to {store.out_dir}; "
               f"{'relabelling needs the token' if server.token else 'read only: no token'}); Ctrl-C to stop")
    try:
        deadline = time.monotonic() + seconds if seconds else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


@click.command("compare")
@click.argument("log_path", metavar="LOG", type=click.Path(path_type=Path))
@click.option("--run", "run_id", type=int, default=None, help="The run in the log. [the last with a shadow]")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as one JSON object.")
def compare_cmd(log_path, run_id, as_json):
    """Compare the line's model with the --shadow candidate on the frames both decided.

    \b
    Agreement, each model's reject rate (NG or unknown), the table of the line's
    labels against the shadow's, and the frames where they disagree (with the
    saved frame, where one was saved). Then promote or roll back on the page:
      lineside run bundles/v1 --source 0 --shadow bundles/v2 --log shift.sqlite --http 8080
      lineside compare shift.sqlite"""
    from lineside.runtime.shadow import compare_log

    report = compare_log(log_path, run_id)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"run {report['run']}: {report['frames']} frames decided by both; agreement "
               f"{report['agreement']:.1%}")
    click.echo(f"reject rate (NG or unknown): line {report['reject_rate']['line']:.1%} "
               f"(model {str(report['line_model'])[:12]}), shadow {report['reject_rate']['shadow']:.1%} "
               f"(model {str(report['shadow_model'])[:12]})")
    for line, row in report["confusion"].items():
        click.echo(f"  line {line}: " + ", ".join(f"shadow {k} {v}" for k, v in sorted(row.items())))
    for d in report["disagreements"]:
        click.echo(f"  frame {d['frame']}: line {d['line']}, shadow {d['shadow']}"
                   + (f" ({d['saved']})" if d["saved"] else ""))


@click.command("score")
@click.argument("log_path", metavar="LOG", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--truth", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="What was really in front of the camera: the JSON of lineside data video --json.")
@click.option("--ok-classes", default=None, help="Labels that mean OK. [the run's own --ok-classes]")
@click.option("--run", "run_id", type=int, default=None, help="The run in the log. [the last]")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG of escapes against false calls, one line per --vote, the best setting ringed.")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as one JSON object.")
def score_cmd(log_path, truth, ok_classes, run_id, plot, as_json):
    """Score a run of the line against the truth, and sweep --reject-below and --vote.

    Every part's answer is worked out again from the logged probabilities for each
    --reject-below and --vote N/M, and counted: escapes (defective parts called
    OK) and false calls (good parts called NG). The best setting has the fewest
    escapes, then the fewest false calls.

    \b
      lineside data video test-parts/ parts.avi --hold 3 --json > truth.json
      lineside run bundles/parts --source parts.avi --roi 80,0,480,480 --ok-classes ok --log replay.sqlite
      lineside score replay.sqlite --truth truth.json --plot tradeoff.png"""
    from lineside.runtime.linescore import score_log

    r = score_log(log_path, truth, ok_classes, run_id)
    if plot is not None:
        from lineside.figures import tradeoff_image, write_png

        r["plot"] = str(write_png(plot, tradeoff_image(r["sweep"], (r["good_parts"], r["defective_parts"]), r["best"],
                                                       f"{r['parts']} parts of {Path(str(r['log'])).name}")))
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(f"run {r['run']}: {r['parts']} parts ({r['good_parts']} good, {r['defective_parts']} defective), "
               f"{r['frames_per_part']} frames each, {r['frames_decided']} frames decided; OK: "
               f"{', '.join(r['ok_classes'])}")
    click.echo(f"{'reject-below':>12s} {'vote':>5s} {'escapes':>8s} {'false calls':>11s} {'right':>6s}")
    for row in r["sweep"]:
        rb = "-" if row["reject_below"] is None else f"{row['reject_below']:.2f}"
        click.echo(f"{rb:>12s} {row['vote']:>5s} {row['escapes']:8d} {row['false_calls']:11d} {row['right']:6d}")
    b = r["best"]
    click.echo(f"best: --reject-below {b['reject_below'] if b['reject_below'] is not None else 'none'} --vote "
               f"{b['vote']}: {b['escapes']} escapes, {b['false_calls']} false calls of {r['parts']} parts")
    if plot is not None:
        click.echo(f"wrote {plot}")
