"""Exported models on the edge box: open a bundle or a lone model file, check it, predict.

Torch-free. A bundle is verified before use (schema version, every file present
with the sha256 recorded in bundle.json); a lone .onnx or .xml carries its own
metadata (labels, input spec) and needs nothing else.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lineside.bundles import (BUNDLE_JSON, EXPORT_REPORT_MD, PRECISIONS, ModelKey, bundle_folder, int8_verdicts,
                              is_bundle, model_digest, read_bundle_doc)
from lineside import runs
from lineside.errors import LinesideError, require
from lineside.files import sha256  # noqa: F401 - where tests and older callers find it
from lineside.metadata import METADATA_KEY, ModelMetadata
from lineside.text import printable
from lineside.spec import InputSpec

BACKENDS = ("auto", "onnxruntime", "openvino")
HINTS = ("latency", "throughput")
# OpenVINO's CPU plugin would otherwise run FP32 models in bfloat16 where the CPU supports
# it, and an INT8 model's float operations too: those of an INT8 model whose metadata asks
# for it ("float_precision": "f32", a distance to good parts: docs/unlabelled.md) run in
# FP32; the others' in the plugin's default, faster here (docs/export.md).
OPENVINO_FP32 = {"INFERENCE_PRECISION_HINT": "f32"}


@dataclass
class RuntimeModel:
    path: Path
    backend: str
    metadata: ModelMetadata
    labels: list[str]
    spec: InputSpec
    checksum: str
    _run: object
    _engine: object = None
    _stream: object = None    # (images, progress) -> probabilities, each image a request of its own
    signature: dict | None = None   # what open_checked found: verified (key id), unsigned, or not checked
    drift_reference: dict | None = None   # a bundle's reference for drift alarms (runtime/drift.py), checked
    _anomaly: object = None   # an anomaly model's images -> (scores, maps), from the graph's other outputs

    def anomaly(self, images: np.ndarray, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """An anomaly model's raw scores (N,) and maps (N, h, w), the maps divided by the
        threshold (1.0 = at the threshold), for (N, H, W, 3) uint8 RGB at the spec's size."""
        if self._anomaly is None or self.metadata.anomaly is None:
            raise LinesideError(f"{self.path}: not an anomaly model (it has no score or map output)")
        images = np.ascontiguousarray(images, dtype=np.uint8)
        scores, maps = [], []
        for s in range(0, len(images), batch):
            sc, m = self._anomaly(images[s:s + batch])
            scores.append(np.asarray(sc, np.float32).reshape(-1))
            maps.append(np.asarray(m, np.float32))
        if not scores:
            return np.zeros(0, np.float32), np.zeros((0, 1, 1), np.float32)
        return np.concatenate(scores), np.concatenate(maps)

    def predict_proba(self, images: np.ndarray, batch: int = 32, progress=None) -> np.ndarray:
        """(N, H, W, 3) uint8 RGB at the spec's size -> (N, classes) probabilities.
        Streamed one image per request through the throughput engine (stream) where the
        backend does so, all of them at once; otherwise in batches (one call on a few
        thousand images would ask the runtime for gigabytes of activations at once).
        progress(k) after every k images."""
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if self._stream is not None and len(images) > 1:
            return self._stream(images, progress)
        out = []
        for s in range(0, len(images), batch):
            out.append(self._run(images[s:s + batch]))
            if progress is not None:
                progress(len(out[-1]))
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), np.float32)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.predict_proba(images)

    def whole(self, images: np.ndarray, progress: bool = False) -> np.ndarray:
        """predict_proba over all of `images` with a progress bar (lineside.scoring hands
        a predictor that has this method all the images at once)."""
        from tqdm import tqdm

        with tqdm(total=len(images), desc="predicting", unit="img", disable=not progress, leave=False) as bar:
            return self.predict_proba(images, progress=bar.update)

    def engine(self, hint: str = "latency") -> "Engine":
        """A one-image-at-a-time engine with requests in flight, for the camera loop.

        hint "latency": one request, all threads on it (a camera at its frame rate);
        "throughput": several requests in parallel (replaying a file as fast as it goes)."""
        if hint not in HINTS:
            raise LinesideError(f"--hint: '{hint}' is not one of {', '.join(HINTS)}")
        return self._engine(hint)


class Engine:
    """Requests 0 <= slot < depth. The image to classify is written into buffer(slot), a
    (1, H, W, 3) uint8 array that is the request's own input memory (no copy on submit);
    submit(slot) starts inference; wait(slot) returns the (classes,) probabilities.
    submit(slot, x) copies x into the buffer first."""

    depth = 1

    def buffer(self, slot: int) -> np.ndarray:
        raise NotImplementedError

    def submit(self, slot: int, x: np.ndarray | None = None):
        raise NotImplementedError

    def wait(self, slot: int) -> np.ndarray:
        raise NotImplementedError


def stream(engine: Engine, x: np.ndarray, shape: tuple[int, ...], progress=None) -> np.ndarray:
    """The answers (each of `shape`: (classes,) for probabilities) to the images x through
    `engine`'s requests in turn: each request takes the next image as soon as its last
    answer is read, so that all of them are busy. Every request is waited on in this
    thread: no Python callback runs in the runtime's threads. progress(1) after each answer."""
    out: list = [None] * len(x)
    pending: dict[int, int] = {}

    def collect(slot: int) -> None:
        out[pending.pop(slot)] = engine.wait(slot)
        if progress is not None:
            progress(1)

    for i in range(len(x)):
        slot = i % engine.depth
        if slot in pending:
            collect(slot)
        engine.submit(slot, x[i:i + 1])
        pending[slot] = i
    for slot in list(pending):
        collect(slot)
    return np.stack(out) if out else np.zeros((0, *shape), np.float32)


def streamer(engine, classes: int):
    """images, progress -> probabilities through stream() and the throughput engine of
    `engine(hint)`, made on first use (the camera loop only needs its own engine); a
    device that takes no throughput hint streams through the latency engine."""
    made: list[Engine] = []

    def many(x: np.ndarray, progress=None) -> np.ndarray:
        if not made:
            try:
                made.append(engine("throughput"))
            except LinesideError:
                made.append(engine("latency"))
        return stream(made[0], x, (classes,), progress)

    return many


class OpenVINOEngine(Engine):
    def __init__(self, compiled, depth: int):
        self.requests = [compiled.create_infer_request() for _ in range(depth)]
        self.buffers = [r.get_input_tensor(0).data for r in self.requests]   # views of the tensors
        self.depth = depth

    def buffer(self, slot):
        return self.buffers[slot]

    def submit(self, slot, x=None):
        if x is not None:
            self.buffers[slot][...] = x
        self.requests[slot].start_async()

    def wait(self, slot):
        request = self.requests[slot]
        request.wait()
        return request.get_output_tensor(0).data[0].copy()


class OnnxRuntimeEngine(Engine):
    """ONNX Runtime has no async API for CPU: requests run on worker threads
    (session.run releases the GIL, and one session serves several threads)."""

    def __init__(self, session, depth: int, shape: tuple[int, ...]):
        from concurrent.futures import ThreadPoolExecutor

        self.session, self.depth = session, depth
        self.name = session.get_inputs()[0].name
        self.pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="lineside-ort")
        self.futures = [None] * depth
        self.buffers = [np.zeros(shape, np.uint8) for _ in range(depth)]

    def buffer(self, slot):
        return self.buffers[slot]

    def submit(self, slot, x=None):
        if x is not None:
            self.buffers[slot][...] = x
        self.futures[slot] = self.pool.submit(self.session.run, None, {self.name: self.buffers[slot]})

    def wait(self, slot):
        return self.futures[slot].result()[0][0]


def open_model(path, backend: str = "auto", precision: str = "fp32", device: str = "CPU",
               threads: int | None = None, manifest: bytes | None = None) -> RuntimeModel:
    """A bundle folder, a bundle.json, or a lone .onnx / .xml file -> a ready model.
    `manifest`: bundle.json's bytes as a signature check read them (lineside.signing), so
    that the files are checked against exactly what was verified."""
    if backend not in BACKENDS:
        raise LinesideError(f"--backend: '{backend}' is not one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise LinesideError(f"--precision: '{precision}' is not one of {', '.join(PRECISIONS)}")
    path = Path(path)
    if is_bundle(path):
        files = _bundle_files(bundle_folder(path), backend, precision, manifest)
    else:
        files = _lone_files(path)
    path = files.model
    if path.suffix == ".xml" and backend == "onnxruntime":
        raise LinesideError(f"{path}: an OpenVINO IR runs on --backend openvino, not onnxruntime")
    if path.suffix == ".xml" or (backend == "openvino" and path.suffix == ".onnx"):
        return _open_openvino(files, device, threads, precision)
    return _open_onnxruntime(files, threads)


def open_checked(path, trusted: dict | None = None, **kw) -> RuntimeModel:
    """open_model, after checking the bundle's signature against the `trusted` keys
    (lineside.signing.load_public_keys) when there are any; the model then runs from the
    very bundle.json that was verified. Its `signature` says what was found."""
    from lineside.signing import signature_state, verify_bundle

    path = Path(path)
    if trusted:
        verified = verify_bundle(path, trusted)
        model = open_model(path, manifest=verified.manifest, **kw)
        model.signature = {"state": "verified", "key_id": verified.key_id, "signed_at": verified.signed_at}
        return model
    model = open_model(path, **kw)
    model.signature = {"state": signature_state(bundle_folder(path)) if is_bundle(path) else "unsigned"}
    return model


@dataclass(frozen=True)
class ModelFiles:
    """The bytes a model is made from, each read once and hashed as read: the runtimes are
    given these bytes, never a path to read again, so what runs is what was checked."""
    model: Path                      # the .onnx or .xml
    data: bytes                      # its bytes
    weights: bytes | None            # an IR's .bin (None for ONNX)
    digest: str                      # the model hash that the log records: covers every file
    declared: ModelMetadata | None   # a bundle's own metadata, which the model file must match
    drift_reference: dict | None = None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise LinesideError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _lone_files(path: Path) -> ModelFiles:
    """A lone .onnx or .xml (and the IR's .bin beside it): self-describing, no manifest."""
    if path.is_dir() and (path / runs.MODEL).is_file():
        raise LinesideError(f"{path}: a training run, not a bundle (lineside export {path} --out BUNDLE first)")
    if not path.is_file():
        raise LinesideError(f"{path}: no such model file or bundle")
    if path.suffix not in (".onnx", ".xml"):
        raise LinesideError(f"{path}: not a model file (expected a bundle folder, .onnx or .xml)")
    data = _read(path)
    hashes = {path.name: hashlib.sha256(data).hexdigest()}
    weights = None
    if path.suffix == ".xml":
        bin_path = path.with_suffix(".bin")
        weights = _read(bin_path) if bin_path.is_file() else b""
        if bin_path.is_file():
            hashes[bin_path.name] = hashlib.sha256(weights).hexdigest()
    return ModelFiles(path, data, weights, model_digest(hashes), None)


def _int8_refusal(folder: Path, precision: str, order) -> str:
    """Why an INT8 model is missing, from the export report beside bundle.json: the gate
    refused it (naming the report and --precision fp32), or it was skipped."""
    if precision != "int8":
        return ""
    verdicts = {r: v for r, v in int8_verdicts(folder).items() if r in order}
    if not verdicts:
        return ""
    said = ", ".join(f"{r} {v}" for r, v in verdicts.items())
    return (f"; the export's INT8 gate: {said} (see {folder / EXPORT_REPORT_MD}); run with --precision fp32, "
            "or export again with --eval DIR")


def _bundle_files(folder: Path, backend: str, precision: str, manifest: bytes | None = None) -> ModelFiles:
    """The model a bundle holds for backend and precision, every file of it read once and
    checked against bundle.json: a file the model reads that bundle.json does not list (an
    IR's weights) is refused, as is any file whose bytes do not match."""
    doc = read_bundle_doc(folder, manifest)
    models = doc["models"]
    order = ["openvino", "onnxruntime"] if backend == "auto" else [backend]
    keys = {b: ModelKey(b, precision).key for b in order}
    for b in order:
        if keys[b] in models:
            break
    else:
        have = ", ".join(sorted(printable(k) for k in models)) or "none"
        raise LinesideError(f"{folder}: bundle has no {precision} model for {'/'.join(order)} (it has: {have})"
                            + _int8_refusal(folder, precision, order))
    entry = models[keys[b]]["files"]
    model_names = [n for n in entry if Path(n).suffix in (".onnx", ".xml")]
    if len(model_names) != 1:
        raise LinesideError(f"{folder}: bundle entry {keys[b]} must list exactly one .onnx or .xml model file")
    model = folder / model_names[0]
    needed = {model.name} | ({model.with_suffix(".bin").name} if model.suffix == ".xml" else set())
    for name in sorted(needed - set(entry)):
        raise LinesideError(f"{folder / name}: the model reads this file but bundle.json does not list it "
                            "(a file outside the manifest is never read)")
    contents, hashes = {}, {}
    for name, info in entry.items():
        f = folder / name
        if not f.is_file():
            raise LinesideError(f"{folder}: bundle file {name} is missing")
        contents[name] = _read(f)
        hashes[name] = hashlib.sha256(contents[name]).hexdigest()
        if hashes[name] != info["sha256"]:
            raise LinesideError(f"{f}: checksum does not match bundle.json (file changed or corrupt)")
    try:
        declared = ModelMetadata.from_dict(doc.get("metadata"), f"{folder / BUNDLE_JSON}")
    except LinesideError as exc:
        raise LinesideError(f"{exc} (bundle.json's metadata)") from None
    weights = contents.get(model.with_suffix(".bin").name) if model.suffix == ".xml" else None
    from .drift import check_reference

    reference = check_reference(doc.get("drift_reference"), str(folder / BUNDLE_JSON))
    return ModelFiles(model, contents[model.name], weights, model_digest(hashes), declared, reference)


def _checked_metadata(files: ModelFiles, text: str | None) -> tuple[ModelMetadata, list[str], InputSpec]:
    """The model file's own metadata; in a bundle, bundle.json's must say the same (labels,
    input spec, views, threshold), or the bundle is refused."""
    meta = ModelMetadata.from_json(text, str(files.model))
    declared = files.declared
    if declared is not None and declared != meta:
        what = [name for name in ("labels", "spec", "test_views", "reject_below")
                if getattr(declared, name) != getattr(meta, name)]
        raise LinesideError(f"{files.model.parent / BUNDLE_JSON}: its metadata ({', '.join(what)}) does not match "
                            f"{files.model.name}'s own (bundle.json edited, or files from two bundles)")
    return meta, list(meta.labels), meta.spec


def _open_onnxruntime(files: ModelFiles, threads: int | None) -> RuntimeModel:
    ort = require("onnxruntime", None)
    path = files.model
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    # The session is made from the file's bytes, never from its path: ONNX Runtime then
    # cannot read weights from an external data file beside it, which no checksum covers
    # (a model that needs one is refused), and it runs exactly the bytes that were hashed.
    data = files.data
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any unloadable file is the same user error
        reason = library_reason(exc)
        hint = (" (a model whose weights lie in an external data file is not supported: export it as one file)"
                if "external" in reason.lower() or "model_path must not be empty" in reason else "")
        raise LinesideError(f"{path}: ONNX Runtime cannot load this model ({exc.__class__.__name__}: {reason}){hint}") \
            from exc
    meta, labels, spec = _checked_metadata(files, session.get_modelmeta().custom_metadata_map.get(METADATA_KEY))
    name = session.get_inputs()[0].name

    def engine(hint: str) -> Engine:
        shape = (1, spec.height, spec.width, 3)
        if hint == "latency":
            return OnnxRuntimeEngine(session, 1, shape)
        # Throughput: one single-threaded session run per core, in parallel.
        cores = threads or os.cpu_count() or 1
        single = ort.SessionOptions()
        single.intra_op_num_threads = 1
        single.inter_op_num_threads = 1
        return OnnxRuntimeEngine(ort.InferenceSession(data, single, providers=["CPUExecutionProvider"]),
                                 max(1, cores), shape)

    # Many images: one image per single-threaded run, a run per core in parallel, as the
    # throughput engine does: 1.4-1.5x the images per second of batches of 32 on one
    # session of all threads (256 images of 224 px, NEU's linear head with four views,
    # 2-core CPU), with the same probabilities.
    many = streamer(engine, len(labels))
    anomaly = None
    if meta.anomaly is not None:
        wanted = [meta.anomaly["score_output"], meta.anomaly["map_output"]]
        if not set(wanted) <= {o.name for o in session.get_outputs()}:
            raise LinesideError(f"{path}: its metadata names outputs {', '.join(wanted)} that the graph lacks")
        anomaly = lambda x: session.run(wanted, {name: x})   # noqa: E731
    return RuntimeModel(path, "onnxruntime", meta, labels, spec, files.digest,
                        lambda x: session.run(None, {name: x})[0], engine, many,
                        drift_reference=files.drift_reference, _anomaly=anomaly)


def library_reason(exc: BaseException) -> str:
    """The line of an ONNX Runtime or OpenVINO error that says what is wrong, without the
    C++ source locations they wrap it in (one line, for a one-line error)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Exception from src/", "Check '")) and " at src/" not in ln]
    reason = (useful or lines or [exc.__class__.__name__])[-1]
    return reason[:300]


VIRTUAL_DEVICES = ("AUTO", "MULTI", "HETERO", "BATCH")


def _check_device(core, device: str):
    """A plain device name (CPU, GPU, GPU.1, NPU) must be one OpenVINO sees on this box;
    AUTO, MULTI:... and HETERO:... choose among those themselves."""
    name = device.upper()
    if name.startswith(VIRTUAL_DEVICES):
        return
    available = list(core.available_devices)
    if name not in available and name.split(".")[0] not in {d.split(".")[0] for d in available}:
        raise LinesideError(f"--device {device}: OpenVINO sees no such device on this box (it has: "
                            f"{', '.join(available) or 'none'}; see lineside devices probe)")


def _read_openvino(core, ov, files: ModelFiles):
    """The model OpenVINO reads from the files' bytes, and its metadata text. As for ONNX
    Runtime: an IR's weights come from the .bin read with it (checksummed in a bundle),
    and an ONNX file may not pull weights from an external data file, which OpenVINO
    would look for even in the working directory."""
    path, data = files.model, files.data
    text = None
    if path.suffix == ".onnx":
        ort = require("onnxruntime", None)
        try:   # made from bytes, an ONNX Runtime session refuses any external data
            session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001
            reason = library_reason(exc)
            hint = (" (a model whose weights lie in an external data file is not supported: export it as one file)"
                    if "external" in reason.lower() or "model_path must not be empty" in reason else "")
            raise LinesideError(f"{path}: OpenVINO cannot read this model ({reason}){hint}") from exc
        text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    try:
        if path.suffix == ".xml":
            blob = np.frombuffer(files.weights, np.uint8) if files.weights else np.zeros(0, np.uint8)
            model = core.read_model(data, ov.Tensor(blob))
        else:
            model = core.read_model(data)
    except Exception as exc:  # noqa: BLE001
        raise LinesideError(f"{path}: OpenVINO cannot read this model ({library_reason(exc)})") from exc
    if model.has_rt_info([METADATA_KEY]):
        text = model.get_rt_info([METADATA_KEY]).astype(str)
    return model, text


def _open_openvino(files: ModelFiles, device: str, threads: int | None, precision: str) -> RuntimeModel:
    ov = require("openvino", None)
    core = ov.Core()
    path = files.model
    model, text = _read_openvino(core, ov, files)
    meta, labels, spec = _checked_metadata(files, text)
    _check_device(core, device)   # fail at open, naming what there is, not mid-run
    exact = precision == "fp32" or meta.provenance.get("float_precision") == "f32"
    config = dict(OPENVINO_FP32) if exact and device.upper().startswith("CPU") else {}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)

    def compile_on_device(m, cfg):
        try:
            return core.compile_model(m, device, cfg)
        except Exception as exc:  # noqa: BLE001
            raise LinesideError(f"--device {device}: OpenVINO cannot compile the model there "
                                f"({library_reason(exc)})") from exc

    def one_image():
        # A static one-image shape compiles to faster kernels than the dynamic batch, and
        # is all some devices (NPU) compile at all.
        m = model.clone()
        m.reshape({m.inputs[0]: [1, spec.height, spec.width, 3]})
        return m

    def engine(hint: str) -> Engine:
        one = compile_on_device(one_image(), dict(config, PERFORMANCE_HINT=hint.upper()))
        if hint == "latency":
            return OpenVINOEngine(one, 1)
        # Twice the optimal number of requests: one waits in Python while the other runs.
        return OpenVINOEngine(one, 2 * max(1, int(one.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))))

    # Many images: the one-image engine's requests in parallel, 1.6-1.8x the images per
    # second of one request on the dynamic batch shape (300 NEU images, a linear head with
    # four views, 2-core CPU), with the same probabilities.
    many = streamer(engine, len(labels))
    anomaly = None
    if meta.anomaly is not None:
        wanted = [meta.anomaly["score_output"], meta.anomaly["map_output"]]
        if not set(wanted) <= {n for o in model.outputs for n in o.get_names()}:
            raise LinesideError(f"{path}: its metadata names outputs {', '.join(wanted)} that the graph lacks")
        compiled: list = []

        def anomaly(x):
            if not compiled:
                compiled.append(compile_on_device(model, config))
            c = compiled[0]
            result = c.create_infer_request().infer({0: x})
            return [result[c.output(n)] for n in wanted]
    return RuntimeModel(path, "openvino", meta, labels, spec, files.digest, many, engine, many,
                        drift_reference=files.drift_reference, _anomaly=anomaly)
