"""Issue 23, item 3: every install line the documentation, the examples and the CLI show works where it is shown.

The package is not on any index: a line that installs it must install the clone (``pip install -e ".[extra]"`` or
``pip install -e .``), and every extra it names must exist in pyproject.toml; other packages (torch, lightning,
matplotlib, …) may be installed by name. Before: ``pip install "lightning-sphere[plot]"`` (in the README and in
``lightning-sphere plot --help``) failed for everyone outside the clone.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: the extras pyproject.toml declares, as the installed package's metadata lists them
EXTRAS = set(metadata("lightning-sphere").get_all("Provides-Extra") or [])
#: the package's own names, which no index has
OURS = re.compile(r"^(lightning[-_]sphere)(\[|$|\s|@)", re.IGNORECASE)


def sources() -> dict[str, str]:
    """Where install lines are shown: the README, the docs, the examples, the package (its messages and the CLI's
    help), and the CLI's help as printed."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "examples").glob("*.py"))]
    files += sorted((ROOT / "lightning_sphere").rglob("*.py"))
    texts = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in files}
    helps = [["--help"], ["plot", "--help"]]
    for args in helps:
        result = subprocess.run([sys.executable, "-m", "lightning_sphere", *args], capture_output=True, text=True)
        texts[f"lightning-sphere {' '.join(args)}"] = result.stdout + result.stderr
    return texts


def install_lines(text: str) -> list[str]:
    """The arguments of every ``pip install`` in ``text`` (up to the end of the line, a quote that closes a message,
    a comment, or a shell operator)."""
    found = []
    for match in re.finditer(r"pip install ([^\n#`&|;]*)", text):
        found.append(match.group(1).split("' ")[0].split('" from')[0].strip().rstrip("'.,)"))
    return found


def requirements(arguments: str) -> list[str]:
    """The requirement arguments of a ``pip install`` (options and their values left out)."""
    words, out, skip = arguments.split(), [], False
    for word in words:
        if skip:
            skip = False
        elif word in ("-c", "--constraint", "-r", "--index-url", "--extra-index-url"):
            skip = True
        elif not word.startswith("-"):
            out.append(word.strip("\"'"))
    return out


def test_every_install_line_works_where_it_is_shown():
    checked, problems = 0, []
    for where, text in sources().items():
        for arguments in install_lines(text):
            for requirement in requirements(arguments):
                checked += 1
                if OURS.match(requirement):
                    problems.append(
                        f"{where}: `pip install {arguments}` installs the package from an index it is not on"
                    )
                extras = re.fullmatch(r"\.(?:\[([\w,]+)\])?", requirement)
                if extras and extras.group(1):
                    missing = set(extras.group(1).split(",")) - EXTRAS
                    if missing:
                        problems.append(f"{where}: `pip install {arguments}` names extras that do not exist: {missing}")
    assert not problems, "\n".join(problems)
    assert checked >= 10  # the lines are really found


@pytest.mark.parametrize(
    "text, expected", [('pip install "lightning-sphere[plot]"', True), ("pip install -e .", False)]
)
def test_the_check_catches_an_index_install(text, expected):
    assert any(OURS.match(r) for a in install_lines(text) for r in requirements(a)) == expected
