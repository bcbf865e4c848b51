#!/usr/bin/env python
"""The screenshots of the status page in the README: `make demo` first, then

    .venv/bin/python docs/screenshots.py            # needs Chromium (Debian: apt-get install chromium)

runs the demo bundle over the demo video with --http, opens the live page and the review
page in headless Chromium, relabels one saved frame, and writes docs/live-page.png and
docs/review-page.png."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from browser import Browser, find_chromium  # noqa: E402

TOKEN = "demo-review-token"


def main() -> int:
    demo = ROOT / "demo-out"
    if not (demo / "bundle" / "bundle.json").is_file():
        sys.exit("run `make demo` first")
    exe = find_chromium()
    if exe is None:
        sys.exit("no Chromium: apt-get install chromium")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "token").write_text(TOKEN)
        proc = subprocess.Popen([sys.executable, "-m", "lineside.cli", "run", str(demo / "bundle"), "--source",
                                 str(demo / "parts.avi"), "--loop", "--pace", "6", "--roi", "80,0,480,480",
                                 "--ok-classes", "card,cube,hat,screw", "--reject-below", "0.6",
                                 "--log", str(tmp / "d.sqlite"), "--save", str(tmp / "saved"),
                                 "--station", "line3-station7", "--http", f"127.0.0.1:{port}",
                                 "--http-token-file", str(tmp / "token"), "--quiet"])
        browser = Browser(exe, tmp / "profile", 1280, 860)
        try:
            time.sleep(25)     # some counts, saved frames and a last hour to show
            browser.goto(f"http://127.0.0.1:{port}/")
            browser.wait_for("document.getElementById('last-frame').naturalWidth > 0")
            time.sleep(1.5)
            browser.screenshot(ROOT / "docs" / "live-page.png")
            browser.goto(f"http://127.0.0.1:{port}/review?verdict=NG")
            browser.wait_for("document.querySelectorAll('.card form').length > 3")
            browser.eval(f"""(() => {{ document.getElementById('token').value = {json.dumps(TOKEN)};
                const card = document.querySelector('.card'); card.querySelector('input').value = 'scratch';
                card.querySelector('form').requestSubmit(); }})()""")
            try:
                browser.wait_for("!!document.querySelector('.card.done')")
            except TimeoutError:
                why = browser.eval(f"""fetch('/api/review/' + document.querySelector('.card').dataset.id, {{method: 'POST',
                    headers: {{'Content-Type': 'application/json', 'X-Lineside-Token': {json.dumps(TOKEN)}}},
                    body: JSON.stringify({{label: 'scratch'}})}}).then(r => r.text()).catch(e => String(e))""")
                sys.exit(f"relabelling failed: {why}")
            browser.wait_for("[...document.images].every((i) => i.complete)")
            browser.screenshot(ROOT / "docs" / "review-page.png")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status") as r:
                print(json.dumps(json.load(r)["counts"]))
        finally:
            browser.close()
            proc.terminate()
            proc.wait(30)
            shutil.rmtree(tmp / "profile", ignore_errors=True)
    print("wrote docs/live-page.png, docs/review-page.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
