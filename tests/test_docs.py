"""Every "§N" the code, the README, the site's pages and the examples cite is a section of docs/theory.md.

The rule: a bare ``§N``, ``§N.M`` or range ``§N–§M`` cites docs/theory.md; one preceded by the word
"paper" (``paper §2.1``, ``paper's §3``) cites a section of Roburin et al. (arXiv 2006.13382) and is not
checked here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lightning_sphere.measurement.metrics import METRICS

ROOT = Path(__file__).resolve().parent.parent
THEORY = ROOT / "docs" / "theory.md"
#: Where citations live; this file is left out, its examples below cite missing sections on purpose.
SOURCES = (
    "lightning_sphere/**/*.py",
    "README.md",
    "docs/**/*.md",
    "examples/*.py",
    "benchmarks/*.py",
    "benchmarks/*.md",
    "tests/*.py",
)

_NUMBER = r"\d+(?:\.\d+)*"
_CITATION = re.compile(rf"(?P<paper>\bpaper(?:'s)?\s+)?§(?P<first>{_NUMBER})(?:\s*[–-]\s*§?(?P<last>{_NUMBER}))?")
_HEADING = re.compile(rf"^#{{2,6}}\s+(?P<number>{_NUMBER})\.?\s", re.MULTILINE)


def sections(markdown: str) -> set[str]:
    """The numbers of the numbered headings: ``## 3. Title`` → ``"3"``, ``### 3.2 Title`` → ``"3.2"``."""
    return {m["number"] for m in _HEADING.finditer(markdown)}


def citations(text: str) -> list[str]:
    """The sections of docs/theory.md that ``text`` cites, in order; a range of whole sections counts each one
    (``§2–§4`` → 2, 3, 4), a range of subsections its two ends."""
    cited = []
    for m in _CITATION.finditer(text):
        if m["paper"]:
            continue
        first, last = m["first"], m["last"]
        if last is None:
            cited.append(first)
        elif first.isdigit() and last.isdigit():
            cited += [str(n) for n in range(int(first), int(last) + 1)]
        else:
            cited += [first, last]
    return cited


def source_files() -> list[Path]:
    files = [path for pattern in SOURCES for path in sorted(ROOT.glob(pattern)) if path.name != Path(__file__).name]
    return [*files, THEORY]


@pytest.fixture(scope="module")
def theory_sections() -> set[str]:
    return sections(THEORY.read_text(encoding="utf-8"))


def test_the_rule_on_examples():
    """The parser itself, on text written here: ranges expand, paper sections are left out."""
    text = "see §2–§4 and §3.1, (paper §2.1), the paper's §5 and §7 table; §6.2–§6.3"
    assert citations(text) == ["2", "3", "4", "3.1", "7", "6.2", "6.3"]
    assert sections("# Title\n## 1. One\n### 1.2 Sub\ntext ## 9. not a heading\n") == {"1", "1.2"}


def test_the_theory_has_its_sections_in_order(theory_sections):
    top = sorted(int(s) for s in theory_sections if s.isdigit())
    assert top == list(range(1, len(top) + 1)) and len(top) >= 9  # numbered 1…N, none missing


def test_every_citation_is_a_section_of_the_theory(theory_sections):
    missing, count, cited_in = [], 0, set()
    for path in source_files():
        text = path.read_text(encoding="utf-8")
        for number in citations(text):
            count += 1
            cited_in.add(path.relative_to(ROOT).as_posix())
            if number not in theory_sections:
                missing.append(f"{path.relative_to(ROOT)}: §{number}")
    assert not missing, f"cited sections missing from docs/theory.md: {missing}"
    assert {
        "README.md",
        "docs/guides/charts.md",
        "docs/guides/correction.md",
        "lightning_sphere/measurement/metrics.py",
        "lightning_sphere/correction/base.py",
    } <= cited_in
    assert count > 50  # the scan found the citations at all


def test_no_file_cites_the_old_name():
    stale = [str(p.relative_to(ROOT)) for p in source_files() if "THEORY.md" in p.read_text(encoding="utf-8")]
    assert not stale


def test_metric_sections_exist(theory_sections):
    for name, metric in METRICS.items():
        assert citations(metric.section) == [metric.section.lstrip("§")], name
        assert metric.section.lstrip("§") in theory_sections, name


def test_the_theory_cites_the_paper():
    text = THEORY.read_text(encoding="utf-8")
    assert "arXiv:2006.13382" in text
    assert "Roburin" in text
