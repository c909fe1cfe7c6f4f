"""Generated blocks in the docs' markdown pages: the text between a pair of markers, rewritten whole by the command
that generates it (`make study-report`, `make retention-docs`), so a test can regenerate a page and compare."""

from __future__ import annotations

import re

BEGIN, END = "<!-- benchmark-report:begin -->", "<!-- benchmark-report:end -->"


def markers(name: str = "") -> tuple[str, str]:
    """The markers a generated block sits between in a page; `name` tells blocks apart (`<!-- benchmark-report
    gemma3-270m:begin -->`)."""
    if not name:
        return BEGIN, END
    return f"<!-- benchmark-report {name}:begin -->", f"<!-- benchmark-report {name}:end -->"


def splice(doc: str, block: str, name: str = "") -> str:
    """`doc` with the text between the (named) report markers replaced by `block`."""
    begin, end = markers(name)
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(doc):
        raise ValueError(f"no {begin} … {end} markers to write the report between")
    return pattern.sub(lambda _: f"{begin}\n{block}{end}", doc)
