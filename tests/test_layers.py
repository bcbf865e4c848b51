"""The floors, enforced: import-linter checks the contracts in pyproject.toml (a module
imports its own floor and those below, lazy imports inside functions included; the
runtime and devices never import torch), and the contract is shown to catch a break."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())", "--no-cache"]


def _lint(where: Path) -> subprocess.CompletedProcess:
    return subprocess.run(LINT, cwd=where, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(where)))


def _floors() -> list[str]:
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    return next(c for c in contracts if c["type"] == "layers")["layers"]


def test_every_module_keeps_to_its_floor():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "2 kept, 0 broken" in r.stdout


def test_the_ground_floor_names_every_module_directly_in_the_package():
    """A new module in lineside/ is on the ground floor only when the contract says so."""
    ground = {m.strip() for m in _floors()[-1].split(":")}
    packages = {p.name for p in (ROOT / "lineside").iterdir() if (p / "__init__.py").is_file()}
    modules = {f"lineside.{p.stem}" for p in (ROOT / "lineside").glob("*.py") if p.stem != "__init__"}
    upper = {m.strip() for layer in _floors()[:-1] for m in layer.split(":")}
    assert modules - {"lineside.cli"} == ground
    assert {f"lineside.{p}" for p in packages} | {"lineside.cli"} == upper


def test_a_lazy_import_of_a_higher_floor_breaks_the_contract(tmp_path):
    """The contract fails when a ground-floor module imports training inside a function
    (the kind of import that hid the old scoring circle)."""
    shutil.copytree(ROOT / "lineside", tmp_path / "lineside", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    spec = tmp_path / "lineside" / "spec.py"
    spec.write_text(spec.read_text() + "\n\ndef _late():\n    from lineside.train.checkpoint import load_checkpoint\n"
                    "    return load_checkpoint\n")
    r = _lint(tmp_path)
    assert r.returncode == 1, r.stdout[-2000:]
    assert "BROKEN" in r.stdout and "lineside.spec -> lineside.train.checkpoint" in r.stdout, r.stdout[-3000:]


MAX_FUNCTION_LINES, MAX_CLASS_LINES = 60, 200


def test_no_function_over_60_lines_and_no_class_over_200_without_a_reason():
    """A function longer than a screen or a class longer than 200 lines says why on its
    first line (a comment starting 'over 200 lines:'), or it is split."""
    import ast

    too_long = []
    for path in sorted((ROOT / "lineside").rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
                length = node.end_lineno - node.lineno + 1
                if length > limit and "# over " not in lines[node.lineno - 1]:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not too_long, too_long
