"""The documentation's pages and their Python blocks, for the tests that check what the pages show.

A ```` ```python ```` block runs (``tests/test_docs_site.py``) unless the line right before it is
``<!-- not run: REASON -->``; such a block is also left out of the checks that its imports and the package names
it mentions resolve (it may show an integration that lands later).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

_BLOCK = re.compile(r"^(?:<!-- not run: (?P<reason>[^>]*?) -->\n)?```python\n(?P<code>.*?)^```", re.M | re.S)


class Block(NamedTuple):
    page: Path
    line: int
    code: str
    not_run: str | None  # the reason it does not run, or None


def pages() -> list[Path]:
    """The README, CONTRIBUTING.md and every Markdown page of the site."""
    return [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted(DOCS.rglob("*.md"))]


def python_blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    return [
        Block(page, text.count("\n", 0, m.start("code")) + 1, m["code"], m["reason"]) for m in _BLOCK.finditer(text)
    ]


def without_blocks_not_run(text: str) -> str:
    """``text`` less its blocks marked ``<!-- not run: … -->``."""
    return _BLOCK.sub(lambda m: "" if m["reason"] is not None else m[0], text)
