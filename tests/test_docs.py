"""The documentation: the site builds with --strict, its command reference comes from
the commands, and every `lineside ...` command line in the README and the guides names
commands and options that exist."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_site_builds_strict_with_the_generated_command_reference(tmp_path):
    pytest.importorskip("mkdocs")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    from lineside.cli import main

    reference = (tmp_path / "site" / "cli" / "index.html").read_text()
    for name, command in main.commands.items():
        assert f"lineside {name}" in reference, name
    assert "--task" in reference and "--false-reject" in reference   # options, from the click objects


def test_the_readme_is_short_and_links_only_pages_that_exist():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    links = re.findall(r"\]\((docs/[^)#]+)\)", text)
    assert links and all((ROOT / link).is_file() for link in links), links


def _command_lines():
    for page in PAGES:
        for line in page.read_text().splitlines():
            stripped = line.strip()
            if line.startswith("    ") and stripped.startswith("lineside "):
                for part in re.split(r"&&|\|", stripped.split("  #")[0].rstrip(" \\")):
                    if part.strip().startswith("lineside "):
                        yield page.name, part.strip()


def _options(command) -> set[str]:
    names = {"--help", "-h"}
    for p in command.params:
        names.update(p.opts)
        names.update(p.secondary_opts)
    return names


@pytest.mark.parametrize("page,line", list(_command_lines()))
def test_every_documented_command_line_names_real_commands_and_options(page, line):
    from lineside.cli import main

    words = shlex.split(line)[1:]
    command = main
    while isinstance(command, click.Group) and words and not words[0].startswith("-"):
        assert words[0] in command.commands, f"{page}: {line}: no command {words[0]}"
        command = command.commands[words.pop(0)]
    known = _options(command)
    unknown = [w.split("=")[0] for w in words if w.startswith("--") and w.split("=")[0] not in known]
    assert not unknown, f"{page}: {line}: unknown option(s) {unknown}"
