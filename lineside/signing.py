"""Signed bundles: `lineside keys new`, `lineside export --sign KEY`, `lineside run --trust PUB`.

A signature covers the whole bundle folder: `signature.json` holds a document listing
the SHA-256 of every file beside it (bundle.json with the metadata and every model
file's hash, export_report.json with the INT8 gate's verdicts, the model files), the
key's id and the time, and an Ed25519 signature over that document (the `cryptography`
package). `verify_bundle` refuses, with one line naming the file at fault, a bundle
that is unsigned, signed by a key that is not trusted, whose signature does not match
its document, or whose folder differs from the document: a file changed, added or
removed. A signature copied from another bundle lists that bundle's hashes, so it
fails on the first file that differs.

Keys: the private key is PKCS#8 PEM (written 0600: keep it on the workstation that
exports), the public key SubjectPublicKeyInfo PEM (copy it to the boxes).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .bundles import BUNDLE_JSON, SIGNATURE_JSON, bundle_folder
from .errors import LinesideError, require
from .files import sha256
from .text import printable

SIGNATURE_FILE = SIGNATURE_JSON
SIGNATURE_SCHEMA = "lineside.signature/1"
MAX_BUNDLE_FILES = 64


def _crypto():
    require("cryptography", "signing")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return serialization, ed25519


def key_id(public_key) -> str:
    """The first 16 hex digits of the SHA-256 of the raw public key."""
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def new_keys(prefix) -> tuple[Path, Path, str]:
    """PREFIX.key (private, 0600) and PREFIX.pub; never overwrites a file."""
    serialization, ed25519 = _crypto()
    prefix = Path(prefix)
    private_path, public_path = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise LinesideError(f"{path}: already exists (lineside never overwrites a key)")
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        private_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private)
        public_path.write_bytes(public)
    except OSError as exc:
        raise LinesideError(f"{prefix}: cannot write the keys ({exc.strerror or exc})") from None
    return private_path, public_path, key_id(key.public_key())


def load_private_key(path):
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise LinesideError(f"--sign {path}: not a usable private key ({getattr(exc, 'strerror', None) or exc})") \
            from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise LinesideError(f"--sign {path}: not an Ed25519 key (make one with lineside keys new)")
    return key


def load_public_keys(text: str) -> dict:
    """--trust PUB[,PUB...] -> {key id: public key}."""
    serialization, ed25519 = _crypto()
    keys = {}
    for part in [p.strip() for p in str(text).split(",") if p.strip()]:
        try:
            key = serialization.load_pem_public_key(Path(part).read_bytes())
        except (OSError, ValueError) as exc:
            raise LinesideError(f"--trust {part}: not a usable public key "
                                f"({getattr(exc, 'strerror', None) or exc})") from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise LinesideError(f"--trust {part}: not an Ed25519 public key")
        keys[key_id(key)] = key
    if not keys:
        raise LinesideError("--trust: name at least one public key file")
    return keys


def _canonical(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _bundle_files(folder: Path) -> dict[str, Path]:
    """Every entry of the bundle folder but the signature; one that is not a plain file
    (a folder, a link) is an error: nothing in a bundle may escape its hashes."""
    files = {}
    for entry in sorted(folder.iterdir()):
        if entry.name == SIGNATURE_FILE:
            continue
        mode = os.lstat(entry).st_mode
        if not stat.S_ISREG(mode):
            raise LinesideError(f"{entry}: a bundle holds plain files only (this is a link or a folder)")
        files[entry.name] = entry
    if len(files) > MAX_BUNDLE_FILES:
        raise LinesideError(f"{folder}: more than {MAX_BUNDLE_FILES} files: not a bundle")
    return files


def sign_bundle(folder, private_key_path) -> dict:
    """Write FOLDER/signature.json over every file in the folder; returns the signed document."""
    folder = Path(folder)
    key = load_private_key(private_key_path)
    if not (folder / BUNDLE_JSON).is_file():
        raise LinesideError(f"{folder}: not a bundle (no {BUNDLE_JSON})")
    doc = {"schema": SIGNATURE_SCHEMA, "key_id": key_id(key.public_key()),
           "signed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "files": {name: sha256(path) for name, path in _bundle_files(folder).items()}}
    signature = base64.b64encode(key.sign(_canonical(doc))).decode()
    (folder / SIGNATURE_FILE).write_text(json.dumps({"signed": doc, "signature": signature}, indent=2))
    return doc


@dataclass(frozen=True)
class Verified:
    key_id: str
    signed_at: str
    manifest: bytes          # bundle.json's bytes as verified: what the runtime must read


def signature_state(folder) -> str:
    """What the log and page say of a bundle not checked with --trust."""
    return "signed, not checked (no --trust)" if (Path(folder) / SIGNATURE_FILE).is_file() else "unsigned"


def verify_bundle(folder, trusted: dict) -> Verified:
    """The bundle's signature checked against the trusted keys and every file in its folder;
    a one-line LinesideError naming the file at fault otherwise."""
    _, ed25519 = _crypto()
    folder = Path(folder)
    folder = bundle_folder(folder)
    sig_path = folder / SIGNATURE_FILE
    if not folder.is_dir():
        raise LinesideError(f"{folder}: --trust needs a bundle folder (a lone model file carries no signature)")
    if not sig_path.is_file():
        raise LinesideError(f"{sig_path}: missing: the bundle is unsigned and --trust accepts signed bundles only")
    try:
        outer = json.loads(sig_path.read_text(encoding="utf-8"))
        doc, signature = outer["signed"], base64.b64decode(outer["signature"], validate=True)
        kid, files = doc["key_id"], doc["files"]
        if doc.get("schema") != SIGNATURE_SCHEMA or not isinstance(files, dict) or not isinstance(kid, str):
            raise ValueError("not a lineside signature")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise LinesideError(f"{sig_path}: unreadable signature ({printable(str(exc))[:120]})") from None
    key = trusted.get(kid)
    if key is None:
        raise LinesideError(f"{sig_path}: signed by key {printable(kid)[:32]}, which --trust does not name "
                            f"(trusted: {', '.join(sorted(trusted))})")
    try:
        key.verify(signature, _canonical(doc))
    except Exception:  # noqa: BLE001 - InvalidSignature, or a signature of the wrong length
        raise LinesideError(f"{sig_path}: the signature does not match its document (edited or forged)") from None
    present = _bundle_files(folder)
    for name in sorted(set(files) - set(present)):
        raise LinesideError(f"{folder / printable(name)}: signed but missing from the bundle")
    for name in sorted(set(present) - set(files)):
        raise LinesideError(f"{present[name]}: not covered by the signature (a file added after signing)")
    manifest = None
    for name, path in present.items():
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != files[name]:
            raise LinesideError(f"{path}: changed since the bundle was signed")
        if name == BUNDLE_JSON:
            manifest = data
    if manifest is None:
        raise LinesideError(f"{folder}: not a bundle (no {BUNDLE_JSON})")
    return Verified(kid, str(doc.get("signed_at", "")), manifest)
