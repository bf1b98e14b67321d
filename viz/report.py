"""Standalone HTML reports: a title, sections of short text and figures, plotly.js embedded once (works offline)."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from viz.theme import FONT_FAMILY

PLOT_CONFIG = {"displaylogo": False, "responsive": True, "toImageButtonOptions": {"format": "png", "scale": 2}}


@dataclass(frozen=True)
class Section:
    """One section of a report: a heading, a short text (blank lines separate paragraphs), an optional table
    (rows of strings, the first row its header; a cell starting with ✓ or ✗ is marked agree / disagree) and
    figures."""

    title: str
    text: str = ""
    figures: Sequence[go.Figure] = field(default_factory=tuple)
    table: Sequence[Sequence[str]] = field(default_factory=tuple)


STYLE = f"""
body {{ font-family: {FONT_FAMILY}; font-size: 16px; line-height: 1.5; color: #222; margin: 0; background: #fafafa; }}
main {{ max-width: 1500px; margin: 0 auto; padding: 24px 32px 64px; }}
h1 {{ font-size: 30px; margin: 8px 0 4px; }}
h2 {{ font-size: 22px; margin: 36px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }}
p {{ max-width: 900px; margin: 6px 0; }}
.meta {{ color: #666; font-size: 14px; }}
nav ol {{ padding-left: 22px; margin: 8px 0; }}
table.summary {{ border-collapse: collapse; margin: 12px 0; background: white; font-size: 15px; }}
table.summary th, table.summary td {{ border: 1px solid #ddd; padding: 6px 12px; text-align: left; }}
table.summary th {{ background: #f0f0f0; }}
td.agree {{ color: #1a7f37; font-weight: 600; }}
td.disagree {{ color: #b42318; font-weight: 600; }}
.figure {{ background: white; border: 1px solid #e4e4e4; border-radius: 4px; margin: 14px 0; padding: 6px;
           overflow-x: auto; }}
"""


def report(
    sections: Sequence[Section | tuple[str, str, Sequence[go.Figure]] | Mapping[str, Any]],
    path: str | Path,
    *,
    title: str = "Circuit analysis",
    subtitle: str = "",
) -> Path:
    """Write one standalone HTML file: title, table of contents, and per section a short text and its figures.

    plotly.js is embedded once in the head, so the file opens offline; each figure is a `div` of class
    `plotly-graph-div` drawn by an inline script. Sections are `Section`s, (title, text, figures) tuples or
    mappings with those keys. Text is escaped (no HTML); blank lines start new paragraphs. Returns the path.
    Example: `report([Section("Heads", "Patching the heads' outputs.", [fig])], "out/report.html")`
    """
    parsed = [_section(s, i) for i, s in enumerate(sections)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style>",
        '<script type="text/javascript">window.PlotlyConfig = {MathJaxConfig: "local"};</script>',
        f'<script type="text/javascript">{get_plotlyjs()}</script>',
        "</head><body><main>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if subtitle:
        parts.append(_paragraphs(subtitle))
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    n_figures = sum(len(s.figures) for s in parsed)
    parts.append(f'<p class="meta">{len(parsed)} sections, {n_figures} figures · written {stamp}</p>')
    parts.append("<nav><ol>" + "".join(f'<li><a href="#section-{i}">{html.escape(s.title)}</a></li>'
                                       for i, s in enumerate(parsed)) + "</ol></nav>")
    n = 0
    for i, s in enumerate(parsed):
        parts.append(f'<section id="section-{i}"><h2>{html.escape(s.title)}</h2>')
        if s.table:
            parts.append(_table(s.table))
        if s.text:
            parts.append(_paragraphs(s.text))
        for fig in s.figures:
            div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{n}", config=PLOT_CONFIG)
            parts.append(f'<div class="figure">{div}</div>')
            n += 1
        parts.append("</section>")
    parts.append("</main></body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _section(item: Section | tuple | Mapping[str, Any], index: int) -> Section:
    if isinstance(item, Section):
        section = item
    elif isinstance(item, Mapping):
        section = Section(item["title"], item.get("text", ""), tuple(item.get("figures", ())),
                          tuple(item.get("table", ())))
    elif isinstance(item, tuple) and len(item) == 3:
        section = Section(item[0], item[1], tuple(item[2]))
    else:
        raise ValueError(f"sections[{index}]: expected a Section, a (title, text, figures) tuple or a mapping, "
                         f"got {type(item).__name__}")
    for j, fig in enumerate(section.figures):
        if not isinstance(fig, go.Figure):
            raise ValueError(f"sections[{index}].figures[{j}]: expected a plotly Figure, got {type(fig).__name__} "
                             "(draw results with the viz functions first)")
    return section


def _table(rows: Sequence[Sequence[str]]) -> str:
    """An HTML table (escaped); the first row is the header; ✓ / ✗ cells are marked agree / disagree."""
    def cell(tag: str, value: object) -> str:
        text = str(value)
        mark = ' class="agree"' if text.startswith("✓") else ' class="disagree"' if text.startswith("✗") else ""
        return f"<{tag}{mark}>{html.escape(text)}</{tag}>"

    head, *body = rows
    out = ["<table class=\"summary\"><thead><tr>" + "".join(cell("th", c) for c in head) + "</tr></thead><tbody>"]
    out += ["<tr>" + "".join(cell("td", c) for c in row) + "</tr>" for row in body]
    return "".join(out) + "</tbody></table>"


def _paragraphs(text: str) -> str:
    paras = [p.strip() for p in text.split("\n\n") if p.strip()]
    return "".join(f"<p>{html.escape(p)}</p>" for p in paras)


def plot_div_count(page: str) -> int:
    """How many Plotly figure divs an HTML page holds (before rendering: class `plotly-graph-div`)."""
    return page.count('class="plotly-graph-div"')

