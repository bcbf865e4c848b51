"""The bundle folder: its file names, its model keys, and bundle.json (written by export,
read by the runtime, signed by lineside.signing). No other module names these files or
builds or takes apart a model key.

    BUNDLE/bundle.json            schema, metadata, every model's files with their SHA-256
    BUNDLE/model_fp32.onnx        one file per model key (an IR: .xml and its .bin)
    BUNDLE/export_report.json/.md what export checked (parity, the INT8 gate)
    BUNDLE/signature.json         with `export --sign`: Ed25519 over every file
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import LinesideError
from .files import sha256
from .metadata import BUNDLE_SCHEMA
from .text import printable

BUNDLE_JSON = "bundle.json"
EXPORT_REPORT_JSON = "export_report.json"
EXPORT_REPORT_MD = "export_report.md"
SIGNATURE_JSON = "signature.json"
REPORT_FILES = (BUNDLE_JSON, EXPORT_REPORT_JSON, EXPORT_REPORT_MD, SIGNATURE_JSON)
PRECISIONS = ("fp32", "int8")
# an anomaly model's IR for OpenVINO Model API's AnomalyDetection (export/openvino_export.py):
# listed and hashed in bundle.json like the models, never opened by lineside itself
MODEL_API_KEY = "model_api_anomaly"
MODEL_API_FILE = "model_api.xml"
SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_REPORT_BYTES = 4_000_000


@dataclass(frozen=True)
class ModelKey:
    """One model of a bundle: the runtime it is made for and its precision. Its `key` names
    it in bundle.json ("openvino_int8", "onnx_fp32"), `file` is its model file."""
    runtime: str        # "openvino" or "onnxruntime"
    precision: str      # "fp32" or "int8"

    _PREFIX = {"openvino": "openvino", "onnxruntime": "onnx"}
    _SUFFIX = {"openvino": ".xml", "onnxruntime": ".onnx"}

    @property
    def key(self) -> str:
        return f"{self._PREFIX[self.runtime]}_{self.precision}"

    @property
    def file(self) -> str:
        return f"model_{self.precision}{self._SUFFIX[self.runtime]}"

    @classmethod
    def parse(cls, key) -> ModelKey | None:
        """The ModelKey a bundle.json key names; None for a key this lineside does not know."""
        prefix, _, precision = str(key).rpartition("_")
        runtime = {v: k for k, v in cls._PREFIX.items()}.get(prefix)
        return cls(runtime, precision) if runtime and precision in PRECISIONS else None


def is_bundle(path) -> bool:
    """A bundle folder, or its bundle.json."""
    path = Path(path)
    return (path.is_dir() and (path / BUNDLE_JSON).is_file()) or path.name == BUNDLE_JSON


def bundle_folder(path) -> Path:
    """The folder of a bundle given as the folder or its bundle.json."""
    path = Path(path)
    return path.parent if path.name == BUNDLE_JSON else path


def manifest_digest(folder) -> str | None:
    """The SHA-256 of a bundle's bundle.json (which covers every file by its hash): what
    tells one bundle from another. None when it cannot be read."""
    try:
        return hashlib.sha256((Path(folder) / BUNDLE_JSON).read_bytes()).hexdigest()
    except OSError:
        return None


def model_digest(hashes: dict[str, str]) -> str:
    """One hash for a model's files: a lone file's own SHA-256; for several, the SHA-256
    of their sorted 'name sha256' lines, so that a changed weights file changes it too."""
    if len(hashes) == 1:
        return next(iter(hashes.values()))
    lines = "".join(f"{name} {digest}\n" for name, digest in sorted(hashes.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def write_bundle_doc(out: Path, metadata: dict, models: dict[str, list[Path]], parity_passed: bool,
                     drift_reference: dict | None = None) -> dict:
    """Write OUT/bundle.json: the metadata, each model key's files with their SHA-256 and
    size, whether the parity check passed, and the drift reference when there is one."""
    doc = {
        "bundle_schema": BUNDLE_SCHEMA,
        "metadata": metadata,
        "models": {key: {"files": {p.name: {"sha256": sha256(p), "bytes": p.stat().st_size} for p in paths}}
                   for key, paths in models.items()},
        "parity_passed": parity_passed,
    }
    if drift_reference is not None:
        doc["drift_reference"] = drift_reference
    (Path(out) / BUNDLE_JSON).write_text(json.dumps(doc, indent=2))
    return doc


def read_bundle_doc(folder: Path, data: bytes | None = None) -> dict:
    """bundle.json of a bundle folder (or its bytes, `data`), checked to be one this
    lineside reads: its schema, and the shape of its model entries (each file a plain name
    with a SHA-256)."""
    doc_path = Path(folder) / BUNDLE_JSON
    if data is None and not doc_path.is_file():
        raise LinesideError(f"{folder}: not a bundle (no {BUNDLE_JSON})")
    try:
        doc = json.loads(data.decode("utf-8") if data is not None else doc_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise LinesideError(f"{doc_path}: unreadable {BUNDLE_JSON} ({str(exc)[:200]})") from None
    if not isinstance(doc, dict) or doc.get("bundle_schema") != BUNDLE_SCHEMA:
        version = doc.get("bundle_schema") if isinstance(doc, dict) else None
        raise LinesideError(f"{doc_path}: bundle schema {printable(repr(version))[:40]} is not supported (this lineside "
                            f"reads {BUNDLE_SCHEMA})")
    models = doc.get("models")
    if not isinstance(models, dict):
        raise LinesideError(f"{doc_path}: 'models' must be a mapping of model entries")
    for key, entry in models.items():
        files = entry.get("files") if isinstance(entry, dict) else None
        if not isinstance(files, dict) or not files:
            raise LinesideError(f"{doc_path}: model {printable(key)[:60]!r} lists no files")
        for name, info in files.items():
            if not (isinstance(name, str) and name and Path(name).name == name and name not in (".", "..")):
                raise LinesideError(f"{doc_path}: model {printable(key)[:60]!r}: {printable(name)[:80]!r} "
                                    "is not a plain file name")
            digest = info.get("sha256") if isinstance(info, dict) else None
            if not (isinstance(digest, str) and SHA256.match(digest)):
                raise LinesideError(f"{doc_path}: {printable(name)[:80]}: no valid sha256 for it")
    return doc


def bundle_precisions(folder: Path) -> set[str]:
    """The precisions a bundle has a model for ("fp32", "int8")."""
    return {k.precision for k in map(ModelKey.parse, read_bundle_doc(folder)["models"]) if k is not None}


def listed_files(folder: Path) -> set[str]:
    """The plain file names a bundle folder's bundle.json lists (none when it is unreadable),
    with the reports export writes beside it: what replacing the bundle may remove."""
    try:
        models = json.loads((Path(folder) / BUNDLE_JSON).read_text()).get("models") or {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        models = {}
    names = {name for entry in models.values() if isinstance(entry, dict)
             for name in (entry.get("files") or {}) if isinstance(name, str)}
    return {n for n in names | set(REPORT_FILES) if Path(n).name == n}


def int8_verdicts(folder: Path) -> dict[str, str]:
    """The INT8 gate's verdict per runtime, from the export report beside bundle.json
    (empty when there is none)."""
    try:
        report = json.loads((Path(folder) / EXPORT_REPORT_JSON).read_bytes()[:MAX_REPORT_BYTES]).get("int8") or {}
        return {r: q.get("verdict") for r, q in report.items() if isinstance(q, dict)}
    except (OSError, ValueError, AttributeError):
        return {}
