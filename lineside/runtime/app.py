"""`lineside run`: options -> source, decider, recorder, signal handling -> the camera loop."""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

from lineside.errors import LinesideError

from .decide import Decider, parse_classes, parse_vote
from .loop import LoopSettings, parse_roi, run_loop, settle_heap
from .model import RuntimeModel
from .records import Recorder, SavePolicy, check_save_options, log_kind
from .sources import describe_source

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    source: str
    pace: float | None = None
    hint: str = "auto"
    loop: bool = False
    roi: str | None = None
    reject_below: float | None = None
    ok_classes: str | None = None
    vote: str | None = None
    log: str | None = "decisions.sqlite"
    log_keep_days: float | None = None   # the log's rows older than this are deleted (SQLite logs)
    save_dir: Path | None = None
    save_when: str = "ng,unknown"
    save_max_files: int = 1000
    save_max_mb: float = 500.0
    max_frames: int | None = None
    seconds: float | None = None
    source_timeout: float | None = None
    mqtt: str | None = None
    mqtt_ca: str | None = None
    mqtt_queue: int = 10_000
    station: str | None = None
    trigger: str | None = None
    trigger_timeout_ms: float = 1000.0
    opcua: str | None = None
    opcua_user: str | None = None
    opcua_cert: str | None = None
    opcua_key: str | None = None
    modbus: str | None = None
    product: str | None = None           # with --products: the product active at the start [the first]
    updates: str | None = None           # a folder watched for new bundles (runtime/updates.py)
    shadow: str | None = None            # a candidate bundle decided beside the line (runtime/shadow.py)
    drift: bool = True                   # drift alarms, where the bundle carries a reference
    drift_window: int = 300
    capture_per_hour: int = 120          # --save-when worth: frames kept for labelling in any hour
    modbus_allow: str | None = None
    http: str | None = None
    http_token_file: str | None = None
    http_hosts: tuple[str, ...] = ()
    review_out: Path | None = None
    display: bool = False
    status: bool = False

    @classmethod
    def from_params(cls, params: dict) -> RunOptions:
        """The options from `lineside run`'s parameters, matched by name (a new field is
        one new option of the same name); the few the CLI names otherwise are mapped here."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in params.items() if k in names}
        log_path = params.get("log_path", "decisions.sqlite")
        values.update(log=None if log_path == "none" else log_path, http_hosts=tuple(params.get("http_hosts") or ()),
                      status=not params.get("quiet") and not params.get("as_json"))
        return cls(**values)

    def __post_init__(self):
        if self.pace is not None and not 0 < self.pace <= 1000:
            raise LinesideError(f"--pace: {self.pace} is outside 0..1000 frames per second")
        for name in ("max_frames", "seconds", "source_timeout", "log_keep_days"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise LinesideError(f"--{name.replace('max_', '').replace('_', '-')}: must be positive")
        # --save-when and its limits, checked with or without --save: a typo is an error either way
        check_save_options(self.when(), self.save_max_files, self.save_max_mb, self.capture_per_hour)

    def when(self) -> tuple[str, ...]:
        return tuple(w.strip() for w in self.save_when.split(",") if w.strip())


def make_decider(model: RuntimeModel, options: RunOptions) -> Decider:
    reject = options.reject_below
    if reject is None:   # the bundle's threshold, if its exporter set one
        reject = model.metadata.reject_below
    ok = parse_classes(options.ok_classes, model.labels, "--ok-classes")
    if ok is None and model.metadata.anomaly is not None:
        ok = ("good",)   # an anomaly model's answer is a verdict: good is OK, anomalous NG
    return Decider(model.labels, reject_below=reject, ok_classes=ok, anomaly=model.metadata.anomaly,
                   vote=parse_vote(options.vote))


class StopOnSignal:
    """SIGINT and SIGTERM set the stop event, so the loop drains and closes cleanly;
    a second signal while stopping is left to the previous handler."""

    def __init__(self, stop: threading.Event):
        self.stop = stop
        self.previous = {}
        self.received = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        if self.stop.is_set():
            handler = self.previous.get(signum)
            if callable(handler):
                handler(signum, frame)
            return
        self.stop.set()

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class StatusLine:
    """A live status line on stderr (once a second), and the optional window."""

    def __init__(self, status: bool, display: bool):
        self.status = status and sys.stderr.isatty()
        self.display = display
        self.last = 0.0
        self.t0 = time.perf_counter()
        if display:
            _check_display()

    def __call__(self, frame, decision, stats):
        now = time.perf_counter()
        fps = stats.frames / max(now - self.t0, 1e-9)
        if self.display:
            _show(frame.image, decision, fps)
        if self.status and now - self.last > 1.0:
            self.last = now
            sys.stderr.write(f"\r{stats.frames} frames  {fps:6.1f} FPS  last: {decision.label} "
                             f"{decision.confidence:.0%} {decision.verdict or ''}   ")
            sys.stderr.flush()

    def close(self):
        if self.status:
            sys.stderr.write("\n")
        if self.display:
            import cv2

            cv2.destroyAllWindows()


def _check_display():
    import cv2

    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) and sys.platform.startswith("linux"):
        raise LinesideError("--display: no screen here (DISPLAY is not set); run headless, the default")
    info = cv2.getBuildInformation()
    if "GTK" not in info and "QT" not in info.upper().split("GUI")[-1][:200]:
        raise LinesideError("--display needs OpenCV with a GUI; install it with: pip install 'lineside[display]'")


def _show(image, decision, fps):
    import cv2

    colour = (0, 200, 0) if decision.verdict == "OK" else (0, 0, 230) if decision.verdict == "NG" else (230, 200, 0)
    view = image.copy()
    cv2.rectangle(view, (0, 0), (view.shape[1] - 1, view.shape[0] - 1), colour, 6)
    text = f"{decision.label} {decision.confidence:.0%} {decision.verdict or ''}  {fps:.0f} FPS"
    cv2.putText(view, text, (12, 32), cv2.FONT_HERSHEY_SIMPLEX, 0.9, colour, 2, cv2.LINE_AA)
    cv2.imshow("lineside", view)
    cv2.waitKey(1)


def _check_save_outside_source(save_dir: Path, info) -> None:
    """Frames saved into a folder being classified would be read back as new parts."""
    if info.kind != "folder":
        return
    source, save = Path(info.text).resolve(), save_dir.resolve()
    if save == source or source in save.parents:
        raise LinesideError(f"--save {save_dir}: is inside the --source folder {info.shown}; saved frames would be "
                            "classified as new parts (choose a folder outside it)")


def run_app(model: RuntimeModel | None, options: RunOptions, opener=None, products: list | None = None,
            load_bundle=None) -> dict:
    """Run the station on `model`, or on `products` (from --products: the first, or the one
    options.product names, active at the start; see runtime/products.py). With
    options.updates, `load_bundle(folder)` opens an update (runtime/updates.py)."""
    info = describe_source(options.source)
    products, switch = _products(model, options, products, load_bundle)
    if switch:
        model, decider, roi = switch.active.model, switch.active.decider, switch.active.roi
    else:
        decider, roi = make_decider(model, options), parse_roi(options.roi)
    candidate = None
    if options.shadow:        # opened and checked now: a candidate that cannot run is a setup error
        try:
            shadow_model = load_bundle(options.shadow)
            candidate = (shadow_model, make_decider(shadow_model, switch.active.settings))
        except LinesideError as exc:      # the bundle's own errors name it already
            raise LinesideError(f"--shadow {options.shadow}: {str(exc).removeprefix(options.shadow + ': ')}") from None
    settings = LoopSettings(roi=roi, loop=options.loop, pace=options.pace, hint=options.hint,
                            max_frames=options.max_frames, seconds=options.seconds,
                            source_timeout=options.source_timeout)
    save = _save_policy(options, info, model, decider, roi, switch)
    status = StatusLine(options.status and not options.trigger == "stdin", options.display)
    settle_heap()   # before anything that answers the line starts (see settle_heap)
    actions: dict = {}      # what the page may ask for with the token: filled once the recorder exists
    triggers, answer_to, server, recorder = _open_line(options, model, info, save, decider, switch, products,
                                                       actions)
    status = _Observed(status, recorder)
    _start_serving(options, server, triggers, answer_to, recorder)
    stop = threading.Event()
    watcher = _update_watcher(options, switch, load_bundle, recorder, stop)
    if watcher is not None:
        actions["update"] = watcher.request      # MQTT's PREFIX/update, OPC UA's UpdateModel
    shadow, drift = _shadow_and_drift(options, candidate, switch, model, recorder, actions)
    if switch is not None:     # from here on only the switch holds the first model: an update releases it
        model = decider = None
    summary = None
    try:
        with StopOnSignal(stop) as signals:
            summary = run_loop(model or switch.active.model, info, settings, decider or switch.active.decider,
                               recorder, stop, on_decision=status, opener=opener, triggers=triggers, switch=switch,
                               drift=drift, shadow=shadow)
        summary["stopped_by"] = signals.received
    finally:
        if triggers:     # parts still waiting get the fail-safe answer
            triggers.close("stopped" if summary is not None else "error")
        status.close()
        if watcher:
            stop.set()
            watcher.join(timeout=30)
        if shadow is not None and shadow.active:
            shadow.stop()     # its last decisions reach the log before it closes
        recorder.close(summary)   # everything handed to the recorder is written before we return
        if server:
            server.close()
        gc.unfreeze()   # the loop does too; not when it failed before it started
    model = model or switch.active.model        # the model running at the end
    summary.update(log=options.log, **recorder.counts(), model=str(model.path), backend=model.backend,
                   signature=model.signature, source=info.shown)
    return _summary(summary, triggers, switch, shadow, watcher)


def _open_line(options: RunOptions, model: RuntimeModel, info, save, decider: Decider, switch, products,
               actions: dict):
    """The trigger requests, the outputs and the recorder they hang off, wired together:
    answers and product switches reach every output. If one fails to start, those
    started before it are closed. Returns (triggers, where answers go, the page's server,
    the recorder)."""
    station = options.station or socket.gethostname()
    triggers, outputs, server = None, [], None
    try:
        triggers, answer_to = _triggers(options, [p.decider for p in products] if products else [decider])
        server = _open_outputs(outputs, options, model, info, station, triggers, switch, products, actions)
        recorder = _recorder(options, model, info, save, station, outputs)
    except BaseException:
        for output in outputs:
            output.close(None)
        if triggers:
            triggers.close()
        if server:
            server.close()
        gc.unfreeze()
        raise
    if triggers:
        answer_to.append(lambda answer: recorder.to_outputs("answer", answer))
    if switch:
        switch.on_event = recorder.event
        switch.listeners.append(lambda product, refused: recorder.to_outputs("product_changed", product, refused))
    return triggers, answer_to, server, recorder


def _start_serving(options: RunOptions, server, triggers, answer_to: list, recorder: Recorder) -> None:
    """The status page starts serving; every answer to a triggered part is logged as an
    event (and with --trigger stdin, printed; stdin read)."""
    if server:
        server.start()
        log.info("status page on %s", server.url)
        if options.status:
            print(f"status page: {server.url}", file=sys.stderr)
    if triggers:
        answer_to.append(lambda a: recorder.event("part_answer", json.dumps(a.as_dict())))
        if options.trigger == "stdin":
            from .trigger import StdinTrigger, print_answer

            answer_to.append(print_answer)
            StdinTrigger(triggers).start()


def _shadow_and_drift(options: RunOptions, candidate, switch, model: RuntimeModel, recorder: Recorder,
                      actions: dict):
    """The shadow model's runner (with the page's promote and rollback) and the drift
    monitor, when the run has them; every output is told of both."""
    shadow = drift = None
    if candidate is not None:
        from .shadow import ShadowRunner

        shadow = ShadowRunner(*candidate, switch.active.roi, recorder)
        shadow.start()
        actions.update(_promotion(switch, shadow, recorder))
    if options.drift:
        from .drift import DriftMonitor

        drift = DriftMonitor(model.drift_reference, recorder.event, window=options.drift_window)
    recorder.to_outputs("watch", drift, shadow)
    return shadow, drift


def _summary(summary: dict, triggers, switch, shadow, watcher) -> dict:
    """The run's summary: the loop's and the recorder's counts, then what each part of
    the station did, and the exit code."""
    if triggers:
        summary["answers"] = dict(triggers.answered)
    if switch:
        summary["products"] = {"active": switch.active.name, "switches": switch.switches, "refused": switch.refused}
    if shadow is not None:
        summary["shadow"] = shadow.summary()
    if watcher:
        summary["updates"] = {"loaded": watcher.loaded, "refused": watcher.refused, "released": watcher.released,
                              "model_sha256": switch.active.model.checksum}
    summary["exit_code"] = exit_code(summary)
    return summary


def _products(model: RuntimeModel | None, options: RunOptions, products: list | None, load_bundle):
    """(products, their ProductSwitch), or (None, None) for a run on one model with
    neither --updates nor --shadow: with those, one model is one product, switched as a
    changeover is."""
    if options.updates and not Path(options.updates).is_dir():
        raise LinesideError(f"--updates {options.updates}: no such folder")
    if (options.updates or options.shadow) and not products:
        from .products import Product

        if load_bundle is None:
            raise LinesideError("--updates / --shadow: this run cannot open bundles (give a bundle folder)")
        products = [Product(0, Path(model.path).parent.name, model, make_decider(model, options),
                            parse_roi(options.roi), settings=options)]
    if not products:
        return None, None
    from .products import ProductSwitch

    switch = ProductSwitch(products)
    if options.product is not None:
        first = switch.find(options.product)
        if first is None:
            raise LinesideError(f"--product {options.product}: no such product (known: "
                                f"{', '.join(p.name for p in products)})")
        switch.active = first
    return products, switch


def _save_policy(options: RunOptions, info, model: RuntimeModel, decider: Decider, roi,
                 switch=None) -> SavePolicy | None:
    """--save DIR: which frames are kept, within which limits (with an anomaly model's
    heatmap beside each NG frame, drawn by the model active then)."""
    if not options.save_dir:
        return None
    _check_save_outside_source(Path(options.save_dir), info)
    return SavePolicy(Path(options.save_dir), options.when(),
                      options.save_max_files, options.save_max_mb, per_hour=options.capture_per_hour,
                      reject_below=decider.reject_below,
                      heatmap=active_heatmap(switch, model, roi) if model.metadata.anomaly is not None else None)


class _Observed:
    """The loop's per-decision hook: every output's observe (the status page's frame,
    MQTT's dropped frames, Modbus's frame counters), then the status line."""

    def __init__(self, status, recorder: Recorder):
        self.status, self.recorder = status, recorder

    def __call__(self, frame, decision, stats):
        if self.recorder.outputs:
            self.recorder.to_outputs("observe", frame, decision, stats)
        self.status(frame, decision, stats)

    def close(self):
        self.status.close()


def _promotion(switch, shadow, recorder) -> dict:
    """The page's two actions: the shadow model becomes the line's, or the previous model
    comes back, between two frames; each is an event naming who asked."""
    from .products import Product

    def promote(who: str) -> dict:
        if not shadow.active:
            raise LinesideError("there is no shadow model to promote (promoted already?)")
        shadow.stop()
        active = switch.active
        product = Product(active.index, active.name, shadow.model, shadow.decider, active.roi,
                          settings=active.settings)
        product.engine = shadow.model.engine(switch.hint)
        switch.replace(product, keep_old=True)
        recorder.event("promoted", f"the shadow model {shadow.model.checksum[:12]} replaces "
                                   f"{active.model.checksum[:12]} on the line, asked for by {who}; the previous "
                                   "model is kept for a rollback")
        return {"promoted": shadow.model.checksum}

    def rollback(who: str) -> dict:
        previous = switch.previous
        if previous is None:
            raise LinesideError("there is no previous model to roll back to")
        current = switch.active
        switch.replace(previous, keep_old=True)
        recorder.event("rolled_back", f"{previous.model.checksum[:12]} replaces {current.model.checksum[:12]} on "
                                      f"the line again, asked for by {who}")
        return {"rolled_back_to": previous.model.checksum}

    return {"promote": promote, "rollback": rollback}


def _update_watcher(options: RunOptions, switch, load_bundle, recorder, stop):
    """--updates DIR: the watcher that loads new bundles and hands them to the switch."""
    if not options.updates:
        return None
    from .products import Product
    from .updates import UpdateWatcher

    folder = Path(options.updates)

    def load(path):
        model = load_bundle(path)
        active = switch.active
        return Product(active.index, active.name, model, make_decider(model, active.settings), active.roi,
                       settings=active.settings)

    watcher = UpdateWatcher(folder, switch, load, recorder.event, stop)
    watcher.start()
    return watcher


def _status_server(options: RunOptions, model: RuntimeModel, info, station: str, switch=None, actions=None):
    """--http: the live page (a peer of the log) and, with a SQLite --log and --save, the review."""
    from .web import LivePage, StatusServer, model_summary, read_token

    review = None
    if options.log and options.save_dir and log_kind(Path(options.log)) == "sqlite":
        from .review import ReviewStore

        review = ReviewStore(options.log, options.save_dir, options.review_out, model.labels)
    page = LivePage(station, model_summary(model), info.shown,
                    heatmap=active_heatmap(switch, model, parse_roi(options.roi))
                    if model.metadata.anomaly is not None else None)
    return StatusServer(options.http, page, review, read_token(options.http_token_file),
                        hosts=options.http_hosts, switch=switch, actions=actions), page


def _triggers(options: RunOptions, deciders: list[Decider]):
    """The trigger requests (None when free-running) and the list of places each answer goes."""
    if not options.trigger:
        return None, []
    from .trigger import TRIGGERS, Triggers

    if options.trigger not in TRIGGERS:
        raise LinesideError(f"--trigger: '{options.trigger}' is not one of {', '.join(TRIGGERS)}")
    if options.trigger == "mqtt" and not options.mqtt:
        raise LinesideError("--trigger mqtt: needs --mqtt (the broker to listen on)")
    if options.trigger == "modbus" and not options.modbus:
        raise LinesideError("--trigger modbus: needs --modbus (the server the PLC writes Trigger to)")
    if options.trigger == "opcua" and not options.opcua:
        raise LinesideError("--trigger opcua: needs --opcua (the server the PLC calls Trigger on)")
    if any(d.ok_classes is None for d in deciders):
        raise LinesideError("--trigger: needs --ok-classes (for every product), so that every answer is OK or NG")
    decider = deciders[0]
    if any(d.vote != decider.vote for d in deciders):
        raise LinesideError("--trigger: every product needs the same vote, so that a part waiting at a switch "
                            "is answered by as many frames as it was promised")
    answer_to: list = []

    def deliver(answer):
        for send in list(answer_to):
            try:
                send(answer)
            except Exception as exc:  # noqa: BLE001 - one output failing never stops the others
                logging.getLogger(__name__).error("answer for %s not delivered: %s", answer.part_id, exc)

    n, m = decider.vote or (1, 1)
    return Triggers(options.trigger_timeout_ms / 1000.0, frames=m, votes=n, on_answer=deliver), answer_to


def active_heatmap(switch, model: RuntimeModel, roi):
    """frame_heatmap by the model active when it is drawn: with a product switch, whatever
    product or update is active then (and it holds no reference to `model`, which an
    update must be able to free); without one, `model` with `roi`."""
    if switch is None:
        return frame_heatmap(model, roi)

    def draw(image):
        active = switch.active
        if active.model.metadata.anomaly is None:
            raise ValueError("the active model is not an anomaly model")
        return frame_heatmap(active.model, active.roi)(image)

    return draw


def frame_heatmap(model: RuntimeModel, roi):
    """An anomaly model's overlay of a camera frame (BGR): the ROI's crop with the map
    drawn over it, for --save beside each NG frame. Runs the model once more, in the
    recorder's thread, for the NG frames saved only."""
    import cv2

    from lineside.heatmap import overlay
    from lineside.spec import resize_to_spec

    def draw(image):
        if roi:
            x, y, w, h = roi
            image = image[y:y + h, x:x + w]
        rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        score, maps = model.anomaly(resize_to_spec(rgb, model.spec)[None])
        return overlay(rgb, maps[0], f"score {float(score[0]) / model.metadata.anomaly['threshold']:.2f}x threshold")

    return draw


def _open_outputs(outputs: list, options: RunOptions, model: RuntimeModel, info, station: str, triggers, switch,
                  products, actions: dict):
    """The outputs the options ask for, appended to `outputs` as each starts (so that a
    failure to start one closes those before it); returns the status page's server."""
    # an update asked for by name (runtime/updates.py), once the watcher exists
    on_update = (lambda name: actions.get("update", lambda _: None)(name)) if options.updates else None
    if options.mqtt:
        from .mqtt import MqttOutput

        if options.mqtt_queue < 1:
            raise LinesideError("--mqtt-queue: must be positive")
        outputs.append(MqttOutput(options.mqtt, station, model.checksum, model.labels, options.mqtt_ca,
                                  options.mqtt_queue, source=info.shown,
                                  on_trigger=triggers.request if options.trigger == "mqtt" else None,
                                  on_product=switch.request if switch else None, on_update=on_update))
    if options.opcua:
        from .opcua import OpcUaOutput

        outputs.append(OpcUaOutput(options.opcua, station, model.checksum, model.labels, user=options.opcua_user,
                                   on_trigger=triggers.request if options.trigger == "opcua" else None,
                                   cert=options.opcua_cert, key=options.opcua_key,
                                   on_product=switch.request if switch and options.opcua_user else None,
                                   on_update=on_update if options.opcua_user else None))
        if switch:
            outputs[-1].labels_by_product = {p.name: list(p.model.labels) for p in products}
    if options.modbus:
        from .modbus import ModbusOutput

        outputs.append(ModbusOutput(options.modbus, model.labels,
                                    triggers=triggers if options.trigger == "modbus" else None,
                                    allow=options.modbus_allow, on_product=switch.request if switch else None,
                                    product=switch.active.index if switch else 0))
    if options.http:
        server, page = _status_server(options, model, info, station, switch, actions)
        outputs.append(page)
        return server
    return None


def _recorder(options: RunOptions, model: RuntimeModel, info, save, station: str, outputs) -> Recorder:
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in options.__dict__.items()
                if k != "mqtt"}      # the broker URL may hold a password
    settings["source"] = info.shown  # and so may a camera's
    settings["signature"] = model.signature
    return Recorder(Path(options.log) if options.log else None,
                    {"source": info.shown, "model": str(model.path), "model_sha256": model.checksum,
                     "signature": model.signature,
                     "labels": model.labels, "settings": settings, "station": station}, save, outputs=outputs,
                    keep_days=options.log_keep_days)


# `lineside run` exit codes (the CLI's --help lists them)
EXIT_OK, EXIT_SETUP, EXIT_NO_FRAMES, EXIT_NOT_LOGGED = 0, 2, 3, 4


def exit_code(summary: dict) -> int:
    """3: the source never delivered a frame, or none for --source-timeout seconds;
    4: decisions were made that are not in the log as rows (see not_logged, and
    unwritable_rows: those kept as events only); else 0."""
    if summary.get("frames_read", 0) == 0 or summary.get("source_timeout"):
        return EXIT_NO_FRAMES
    if summary.get("not_logged") or summary.get("unwritable_rows"):
        return EXIT_NOT_LOGGED
    return EXIT_OK
