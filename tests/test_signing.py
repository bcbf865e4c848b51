"""Signed bundles: `lineside keys new`, `export --sign`, `run --trust`. A tampered, unsigned
or foreign-signed bundle is refused in every variant, with one line naming the file."""

import json
import os
import shutil
import stat

import pytest
from click.testing import CliRunner

from lineside.cli import main
from lineside.errors import LinesideError
from lineside.signing import SIGNATURE_FILE, load_public_keys, new_keys, sign_bundle, verify_bundle

pytest.importorskip("cryptography")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    private, public, kid = new_keys(folder / "line3")
    other_private, other_public, _ = new_keys(folder / "other")
    return {"private": private, "public": public, "id": kid, "other_private": other_private,
            "other_public": other_public}


@pytest.fixture(scope="module")
def signed(tiny_bundle, keys, tmp_path_factory):
    folder = tmp_path_factory.mktemp("signed") / "bundle"
    shutil.copytree(tiny_bundle[0], folder)
    sign_bundle(folder, keys["private"])
    return folder


def _copy(signed, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(signed, out)
    return out


def test_keys_are_made_once_and_the_private_one_is_private(keys, tmp_path):
    assert stat.S_IMODE(os.stat(keys["private"]).st_mode) == 0o600
    assert keys["public"].read_text().startswith("-----BEGIN PUBLIC KEY-----")
    res = CliRunner().invoke(main, ["keys", "new", str(keys["private"].with_suffix("")), "--json"])
    assert res.exit_code == 2 and "already exists" in res.output
    res = CliRunner().invoke(main, ["keys", "new", str(tmp_path / "k"), "--json"])
    assert res.exit_code == 0 and len(json.loads(res.stdout)["key_id"]) == 16


def test_a_signed_bundle_runs_under_trust_and_says_so(signed, keys, synth_test_dir, tmp_path):
    folder = synth_test_dir / "hat"
    res = CliRunner().invoke(main, ["run", str(signed), "--source", str(folder), "--trust", str(keys["public"]),
                                    "--log", str(tmp_path / "log.jsonl"), "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["signature"]["state"] == "verified" and summary["signature"]["key_id"] == keys["id"]
    run_line = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert run_line["signature"]["state"] == "verified"
    res = CliRunner().invoke(main, ["run", str(signed), "--source", str(folder), "--log", "none", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["signature"]["state"] == "signed, not checked (no --trust)"


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def _edit_labels(folder):
    doc = json.loads((folder / "bundle.json").read_text())
    doc["metadata"]["labels"] = list(reversed(doc["metadata"]["labels"]))
    (folder / "bundle.json").write_text(json.dumps(doc))


def _edit_signed_document(folder):
    outer = json.loads((folder / SIGNATURE_FILE).read_text())
    outer["signed"]["files"]["model_fp32.bin"] = "0" * 64
    (folder / SIGNATURE_FILE).write_text(json.dumps(outer))


VARIANTS = {
    "changed weights": (lambda f: _flip_last_byte(f / "model_fp32.bin"), "model_fp32.bin: changed since"),
    "changed onnx": (lambda f: _flip_last_byte(f / "model_fp32.onnx"), "model_fp32.onnx: changed since"),
    "changed labels": (_edit_labels, "bundle.json: changed since"),
    "changed report": (lambda f: (f / "export_report.json").write_text("{}"), "export_report.json: changed since"),
    "file added": (lambda f: (f / "extra.onnx").write_bytes(b"x"), "extra.onnx: not covered by the signature"),
    "file removed": (lambda f: (f / "export_report.md").unlink(), "export_report.md: signed but missing"),
    "link added": (lambda f: (f / "link.bin").symlink_to(f / "model_fp32.bin"), "link.bin: a bundle holds plain"),
    "unsigned": (lambda f: (f / SIGNATURE_FILE).unlink(), "signature.json: missing: the bundle is unsigned"),
    "signature edited": (_edit_signed_document, "the signature does not match its document"),
    "signature garbage": (lambda f: (f / SIGNATURE_FILE).write_text("[1, 2"), "unreadable signature"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_tampered_variant_is_refused_with_one_line(signed, keys, synth_test_dir, tmp_path, variant):
    folder = _copy(signed, tmp_path)
    tamper, needle = VARIANTS[variant]
    tamper(folder)
    with pytest.raises(LinesideError, match=needle.replace("(", r"\(")):
        verify_bundle(folder, load_public_keys(str(keys["public"])))
    res = CliRunner().invoke(main, ["run", str(folder), "--source", str(synth_test_dir / "hat"), "--log", "none",
                                    "--trust", str(keys["public"])])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], res.output


def test_another_key_and_a_replayed_signature_are_refused(signed, keys, tiny_run, tmp_path):
    from lineside.export.bundle import export_bundle

    foreign = _copy(signed, tmp_path)
    sign_bundle(foreign, keys["other_private"])           # a valid signature, by a key the box does not trust
    with pytest.raises(LinesideError, match="signed by key .* which --trust does not name"):
        verify_bundle(foreign, load_public_keys(str(keys["public"])))
    assert verify_bundle(foreign, load_public_keys(f"{keys['public']},{keys['other_public']}")).key_id
    # another bundle, signed by the trusted key: its signature copied onto ours is a replay
    other = tmp_path / "other"
    export_bundle(tiny_run[0], other, formats=["onnx"], int8=False, speed_seconds=0, tta=False)
    sign_bundle(other, keys["private"])
    replay = _copy(signed, tmp_path / "replay")
    shutil.copy(other / SIGNATURE_FILE, replay / SIGNATURE_FILE)
    with pytest.raises(LinesideError, match=r"(changed since|signed but missing|not covered)"):
        verify_bundle(replay, load_public_keys(str(keys["public"])))


def test_export_signs_and_a_forced_reexport_drops_the_old_signature(tiny_run, keys, tmp_path):
    out = tmp_path / "b"
    res = CliRunner().invoke(main, ["export", str(tiny_run[0]), "--out", str(out), "--formats", "onnx", "--no-int8",
                                    "--speed-seconds", "0", "--sign", str(keys["private"]), "--quiet"])
    assert res.exit_code == 0, res.output
    assert f"signature.json (key {keys['id']})" in res.output
    assert verify_bundle(out, load_public_keys(str(keys["public"]))).key_id == keys["id"]
    res = CliRunner().invoke(main, ["export", str(tiny_run[0]), "--out", str(out), "--formats", "onnx", "--no-int8",
                                    "--speed-seconds", "0", "--force", "--quiet"])
    assert res.exit_code == 0 and not (out / SIGNATURE_FILE).exists()
    res = CliRunner().invoke(main, ["export", str(tiny_run[0]), "--out", str(tmp_path / "c"), "--sign",
                                    str(keys["public"])])
    assert res.exit_code == 2 and "--sign" in res.output and "not a usable private key" in res.output
