"""Headless Chromium for the browser tests: open a page, report its JavaScript errors and what Plotly drew.

The probe is a script injected at the top of a page's <head>: it records uncaught errors, rejected promises and
console.error calls, then (after load) writes them and the counts of rendered plots into the DOM, which
`chromium --dump-dom` prints. Tests are skipped, saying why, only when no Chromium is installed (CI's `.ci/run`
installs Debian's `chromium`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium on PATH (Debian: apt-get install "
                                    "chromium; .ci/run installs it)")

PROBE = """<script>
window.__probe = [];
window.addEventListener("error", e => window.__probe.push("error: " + e.message));
window.addEventListener("unhandledrejection", e => window.__probe.push("rejection: " + e.reason));
(function () { const ce = console.error; console.error = function (...a) {
  window.__probe.push("console.error: " + a.join(" ")); ce.apply(console, a); }; })();
window.addEventListener("load", () => setTimeout(() => {
  const out = document.createElement("pre"); out.id = "__probe";
  out.textContent = JSON.stringify({errors: window.__probe,
    rendered: document.querySelectorAll(".js-plotly-plot").length,
    svgs: document.querySelectorAll(".js-plotly-plot .main-svg").length,
    tables: document.querySelectorAll(".js-plotly-plot .table").length});
  document.body.appendChild(out); }, 500));
</script>"""


def chromium(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """Run headless Chromium once (no sandbox: CI runs as root)."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--disable-extensions", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def console_errors(stderr: str) -> list[str]:
    """Console lines Chromium logged for the page that report an error."""
    lines = [ln for ln in stderr.splitlines() if ":CONSOLE" in ln]
    return [ln for ln in lines if re.search(r"Uncaught|Error|error", ln)]


def inject_probe(html: str) -> str:
    """The page with the probe as the first thing in its head."""
    return html.replace("<head>", "<head>" + PROBE, 1) if "<head>" in html else PROBE + html


def read_probe(url: str) -> tuple[dict, list[str]]:
    """Open `url` (a page carrying the probe); return the probe's findings and Chromium's console errors."""
    run = chromium("--dump-dom", url)
    assert run.returncode == 0, run.stderr[-2000:]
    found = re.search(r'<pre id="__probe">(.*?)</pre>', run.stdout, flags=re.S)
    assert found, f"the probe did not report on {url}: the page did not finish loading within the time budget"
    text = found.group(1).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    return json.loads(text), console_errors(run.stderr)


def probe(page: Path, tmp: Path) -> tuple[dict, list[str]]:
    """Open a copy of the file `page` with the probe injected (over file://)."""
    probed = tmp / f"probed-{page.name}"
    probed.write_text(inject_probe(page.read_text(encoding="utf-8")), encoding="utf-8")
    return read_probe(probed.as_uri())


def screenshot(url: str, path: Path, size: str = "1400,3000") -> Path:
    """A PNG of `url` as a reader sees it (for a person to look at); asserts it is not blank."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    run = chromium(f"--screenshot={path}", f"--window-size={size}", url)
    assert run.returncode == 0, run.stderr[-2000:]
    assert console_errors(run.stderr) == [], console_errors(run.stderr)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return path
