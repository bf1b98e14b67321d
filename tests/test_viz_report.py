"""viz.report: one standalone HTML file (plotly.js once), checked in headless Chromium.

The browser test opens the report of a small analysis of the planted model, asserts that no JavaScript error
reached the console, that every figure div was rendered by Plotly, and writes a screenshot to
out/viz-test/screenshot.png for a person to look at. It is skipped, saying why, only when no Chromium is
installed (CI's `.ci/run` installs Debian's `chromium`).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from browser import chromium, console_errors, needs_chromium, probe
from plotly.offline import get_plotlyjs
from test_viz_figures import direct_logit_attribution, previous_token_scores

import viz
from circuits.weights.composition import all_composition_scores
from viz.report import plot_div_count

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT_DIR = ROOT / "out" / "viz-test"


def small_analysis(model) -> list[viz.Section]:
    from circuits.tasks.induction import induction_task

    task = induction_task(4, 8, 32, seed=3)
    _, cache = model.run_with_cache(task.clean)
    tokens = [f"t{i}" for i in task.clean[0].tolist()]
    prev = previous_token_scores(cache, 2)
    with torch.no_grad():
        ind = model.planted.induction
        full_ov = model.W_E @ model.OV[ind] @ model.W_U
    vocab = [f"t{i}" for i in range(model.cfg.d_vocab)]
    n = torch.arange(1, 7)
    return [
        viz.Section("Attention", "Layer 1's heads on a repeated sequence.\n\nThe induction head looks one token "
                    "after the earlier copy.", [viz.draw_attention(cache["blocks.1.attn.hook_pattern"][0], tokens,
                                                                    heads=["L1H0", "L1H1", "L1H2"])]),
        viz.Section("Previous-token attention", "Per layer, head and position.", [viz.draw_result(prev)]),
        viz.Section("Direct logit attribution", "Signed: red raises the answer.",
                    [viz.draw_dla(direct_logit_attribution(model, cache, task))]),
        viz.Section("Composition", "Scores against their baseline.",
                    [viz.draw_composition(all_composition_scores(model))]),
        viz.Section("OV circuit of the induction head", "Top pairs and spectrum.",
                    [viz.draw_top_pairs(full_ov, vocab, vocab, k=8), viz.draw_eigenvalues({"L1H1": full_ov})]),
        viz.Section("Curves <script>alert(1)</script>", "Escaped & plain.",
                    [viz.draw_faithfulness({"a": (n, n / 6), "b": (n, (n / 6) ** 0.5)}),
                     viz.draw_roc({"a": (torch.tensor([0, 0, 0.5, 1.0]), torch.tensor([0, 1.0, 1.0, 1.0]))})]),
    ]


@pytest.fixture(scope="module")
def analysis(planted):
    return small_analysis(planted)


N_FIGURES = 8


def test_report_embeds_plotlyjs_once_and_every_figure(analysis, tmp_path):
    path = viz.report(analysis, tmp_path / "nested" / "report.html", title="Planted induction", subtitle="A test.")
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert page.count(get_plotlyjs()[:200]) == 1  # the library, embedded once
    assert "<script src" not in page  # nothing loaded from elsewhere: the file works offline
    assert "https://" not in re.sub(r"<script[^>]*>.*?</script>", "", page, flags=re.S)
    assert plot_div_count(page) == N_FIGURES == sum(len(s.figures) for s in analysis)
    for i in range(N_FIGURES):
        assert f'id="figure-{i}"' in page
    assert "<h1>Planted induction</h1>" in page and "<p>A test.</p>" in page
    assert page.count("<h2>") == len(analysis)
    assert "<p>Layer 1&#x27;s heads on a repeated sequence.</p><p>The induction head" in page  # paragraphs
    assert "Curves &lt;script&gt;alert(1)&lt;/script&gt;" in page and "Escaped &amp; plain." in page
    assert path.stat().st_size < 15 * 2**20


def test_report_rejects_what_is_not_a_figure(tmp_path, analysis):
    with pytest.raises(ValueError, match=r"sections\[0\]\.figures\[0\]: expected a plotly Figure"):
        viz.report([("t", "x", ["not a figure"])], tmp_path / "r.html")
    with pytest.raises(ValueError, match=r"sections\[1\]"):
        viz.report([analysis[0], 3], tmp_path / "r.html")
    ok = viz.report([{"title": "t", "text": "x", "figures": analysis[1].figures}], tmp_path / "r.html")
    assert plot_div_count(ok.read_text()) == 1


@needs_chromium
def test_the_probe_catches_javascript_errors(tmp_path):
    """Negative control: a page with a broken script must be reported, or the browser test proves nothing."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head></head><body><script>console.error("boom");'
                   "undefined_function();</script></body></html>")
    found, console = probe(bad, tmp_path)
    assert any("boom" in e for e in found["errors"])
    assert any("undefined_function" in e for e in found["errors"])
    assert any("undefined_function" in ln for ln in console)


@needs_chromium
def test_report_renders_in_headless_chromium(analysis, tmp_path):
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    path = viz.report(analysis, SCREENSHOT_DIR / "report.html", title="Planted induction: viz browser test")
    found, console = probe(path, tmp_path)
    assert found["errors"] == [], found["errors"]
    assert console == [], console
    assert found["rendered"] == N_FIGURES  # every figure div was drawn by Plotly
    assert found["svgs"] >= N_FIGURES
    assert found["tables"] == 1  # the top-pairs table
    # the unmodified page as a reader opens it: no console errors, and a screenshot to look at
    shot = SCREENSHOT_DIR / "screenshot.png"
    shot.unlink(missing_ok=True)
    run = chromium(f"--screenshot={shot}", "--window-size=1500,5200", path.as_uri())
    assert run.returncode == 0, run.stderr[-2000:]
    assert console_errors(run.stderr) == []
    assert shot.stat().st_size > 50_000  # a blank page is a few KB
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_table_marks_agreement_and_escapes(tmp_path):
    rows = [["", "weights", "the lenses"], ["induction head", "L1H1 <b>", "✓ agree"],
            ["previous", "L0H2", "✗ disagree"]]
    page = viz.report([viz.Section("Summary", "text", [], rows)], tmp_path / "r.html").read_text(encoding="utf-8")
    assert page.count('<table class="summary">') == 1 and "<th>weights</th>" in page
    assert "<td>L1H1 &lt;b&gt;</td>" in page
    assert '<td class="agree">✓ agree</td>' in page and '<td class="disagree">✗ disagree</td>' in page
    assert page.index("<table") < page.index("<p>text</p>")  # the table first, then the text
