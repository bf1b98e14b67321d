"""MkDocs hook: run the tutorials' code at build time, so a broken example fails the build.

A fenced block opened with ```python exec runs in one namespace per page, in order. Its source is
shown, followed by what it printed and by every Plotly figure it passed to `show(fig)`. An exception
stops the build with the page and the block's first line. plotly.js is written once into the site and
loaded in the `<head>` of every page that has a figure: each figure's inline `Plotly.newPlot` runs where the
figure stands, so the library must be loaded before it (a script at the end of the page is too late).
"""

from __future__ import annotations

import contextlib
import io
import re
import traceback
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.utils import get_relative_url

FENCE = re.compile(r"^```python exec\s*\n(.*?)^```\s*$", re.S | re.M)
PLOTLY_JS = "assets/plotly.min.js"


def on_page_markdown(markdown, page, config, files):
    if "```python exec" not in markdown:
        return markdown
    namespace: dict = {"__name__": f"docs.{page.file.src_uri}"}
    shown: list = []
    namespace["show"] = shown.append

    def run(match: re.Match) -> str:
        source = match.group(1)
        stdout = io.StringIO()
        shown.clear()
        try:
            with contextlib.redirect_stdout(stdout):
                exec(compile(source, f"<{page.file.src_uri}>", "exec"), namespace)
        except Exception as err:
            first = source.strip().splitlines()[0] if source.strip() else ""
            raise PluginError(
                f"{page.file.src_uri}: the example starting {first!r} raised:\n{traceback.format_exc()}"
            ) from err
        parts = [f"```python\n{source}```"]
        if stdout.getvalue().strip():
            parts.append(f"```text\n{stdout.getvalue().rstrip()}\n```")
        for fig in shown:
            html = fig.to_html(full_html=False, include_plotlyjs=False, config={"responsive": True})
            parts.append(f'<div class="plotly-figure">\n{html}\n</div>')
        return "\n\n".join(parts)

    return FENCE.sub(run, markdown)


def on_post_page(output, page, config):
    """Load plotly.js in the head of a page with figures (a relative URL: the site also works over file://)."""
    if "plotly-figure" not in output:
        return output
    src = get_relative_url(PLOTLY_JS, page.url)
    return output.replace("</head>", f'<script src="{src}"></script>\n</head>', 1)


def on_post_build(config):
    from plotly.offline import get_plotlyjs

    target = Path(config["site_dir"]) / PLOTLY_JS
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(get_plotlyjs())
