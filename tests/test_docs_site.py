"""The docs site as a reader sees it: built, served on loopback, every tutorial page opened in headless Chromium.

Each page must load with no JavaScript error and every figure on it must be drawn by Plotly (as many rendered
plots as the page has figure divs). Screenshots go to out/docs-test/ for a person to look at. The API reference
must document every public name of each package (its `__all__`) by its own object, and nothing else.
"""

from __future__ import annotations

import ast
import functools
import http.server
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from browser import inject_probe, needs_chromium, read_probe, screenshot

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "out" / "docs-test"
API_PAGES = {"circuits.models": "models", "circuits.tasks": "tasks", "circuits.weights": "weights",
             "circuits.activations": "activations", "circuits.graph": "graph", "circuits.verdicts": "verdicts",
             "viz": "viz"}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built strictly (tutorials executed) into a temporary folder."""
    out = tmp_path_factory.mktemp("site")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(out)],
                         cwd=ROOT, capture_output=True, text=True, env={**__import__("os").environ,
                                                                         "NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def served(site):
    """The built site over http on 127.0.0.1 (a free port), with the error probe in every tutorial page."""
    for page in (site / "tutorials").glob("*/index.html"):
        page.write_text(inject_probe(page.read_text(encoding="utf-8")), encoding="utf-8")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def tutorial_pages() -> list[str]:
    return sorted(p.stem for p in (ROOT / "docs" / "tutorials").glob("*.md"))


def test_every_tutorial_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    assert tutorial_pages() and all(f"tutorials/{name}.md" in nav for name in tutorial_pages())


def test_plotlyjs_loads_before_the_first_figure(site):
    for page in (site / "tutorials").glob("*/index.html"):
        html = page.read_text(encoding="utf-8")
        if "plotly-graph-div" in html:
            assert html.index("plotly.min.js") < html.index("Plotly.newPlot"), page
    assert (site / "assets" / "plotly.min.js").stat().st_size > 1_000_000


@needs_chromium
@pytest.mark.parametrize("name", tutorial_pages())
def test_tutorial_renders_in_headless_chromium(site, served, name):
    html = (site / "tutorials" / name / "index.html").read_text(encoding="utf-8")
    expected = html.count('class="plotly-graph-div"')
    found, console = read_probe(f"{served}/tutorials/{name}/")
    assert found["errors"] == [], found["errors"]
    assert console == [], console
    assert found["rendered"] == expected, f"{found['rendered']} of {expected} figures drawn"
    assert found["svgs"] >= expected
    screenshot(f"{served}/tutorials/{name}/", SHOTS / f"{name}.png", size="1400,6000")


@needs_chromium
def test_the_probe_sees_a_figure_that_does_not_draw(site, served):
    """Negative control: a page whose plotly.js is missing must fail the same check."""
    page = site / "tutorials" / "broken" / "index.html"
    page.parent.mkdir(exist_ok=True)
    html = (site / "tutorials" / "discovery" / "index.html").read_text(encoding="utf-8")
    page.write_text(re.sub(r'<script src="[^"]*plotly\.min\.js"></script>', "", html), encoding="utf-8")
    found, _ = read_probe(f"{served}/tutorials/broken/")
    assert found["rendered"] == 0 and any("Plotly is not defined" in e for e in found["errors"])


def public_names(package: str) -> list[str]:
    """The names in a package's `__all__` (read from its source, without importing it)."""
    tree = ast.parse((ROOT / package.replace(".", "/") / "__init__.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
            return [ast.literal_eval(e) for e in node.value.elts]
    raise AssertionError(f"{package} has no __all__")


@pytest.mark.parametrize("package", sorted(API_PAGES))
def test_api_reference_documents_every_public_name_and_no_other(package):
    import importlib

    page = (ROOT / "docs" / "api" / f"{API_PAGES[package]}.md").read_text()
    documented = re.findall(r"^::: (\S+)$", page, flags=re.M)
    assert documented[0] == package  # the package's own docstring first
    pkg = importlib.import_module(package)
    names = []
    for path in documented[1:]:
        module, name = path.rsplit(".", 1)
        obj = getattr(importlib.import_module(module), name)
        assert obj is getattr(pkg, name), f"{path} is not {package}.{name}"
        names.append(name)
    assert sorted(names) == sorted(public_names(package))


def test_built_api_reference_has_each_function_not_its_module(site):
    """`acdc`, `eap`, `faithfulness`, `logit_lens`, `build`, `train`, `skip_trigrams`, `viz.report` share their
    names with their modules: the reference must show the function (its signature), not the module."""
    for page, module, name in (("graph", "circuits.graph.acdc", "acdc"), ("graph", "circuits.graph.eap", "eap"),
                               ("graph", "circuits.graph.faithfulness", "faithfulness"),
                               ("activations", "circuits.activations.logit_lens", "logit_lens"),
                               ("models", "circuits.models.build", "build"),
                               ("models", "circuits.models.train", "train"),
                               ("weights", "circuits.weights.skip_trigrams", "skip_trigrams"),
                               ("viz", "viz.report", "report")):
        html = (site / "api" / page / "index.html").read_text(encoding="utf-8")
        assert f'id="{module}.{name}"' in html, f"{module}.{name} missing from api/{page}"
