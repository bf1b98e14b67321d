"""Generated blocks in Markdown pages: what lies between the lines `<!-- NAME:start -->` and `<!-- NAME:end -->`.

The zoo table (`python -m circuits.models.zoo --table --readme ...`) and the benchmark table
(`python -m bench.table --readme ...`) are written into the README and the docs this way, never by hand.
"""

from __future__ import annotations

import re
from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    """The start and end marker lines of block `name`. Example: `markers("zoo")[0] == "<!-- zoo:start -->"`"""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def _pattern(name: str) -> re.Pattern[str]:
    start, end = markers(name)
    return re.compile(rf"^{re.escape(start)}[ \t]*$(.*?)^{re.escape(end)}[ \t]*$", re.MULTILINE | re.DOTALL)


def marked_block(text: str, name: str) -> str | None:
    """What lies between the marker lines of block `name` in `text` (None if there is no such block).

    A marker counts only on a line of its own, so prose that quotes the markers is not a block.
    Example: `marked_block(Path("README.md").read_text(), "bench")`
    """
    found = _pattern(name).search(text)
    return None if found is None else found.group(1)


def rewrite_marked_block(path: str | Path, name: str, block: str) -> bool:
    """Replace what lies between the marker lines of block `name` in file `path` by `block`.

    Returns whether the file changed (a second call with the same block changes nothing); a file without the
    block is an error. Example: `rewrite_marked_block("README.md", "zoo", table)`
    """
    path = Path(path)
    text = path.read_text()
    found = _pattern(name).search(text)
    if found is None:
        start, end = markers(name)
        raise ValueError(f"readme: {path} has no {start} … {end} block (each marker on a line of its own)")
    new = text[: found.start(1)] + "\n" + block.strip("\n") + "\n" + text[found.end(1) :]
    if new == text:
        return False
    path.write_text(new)
    return True
