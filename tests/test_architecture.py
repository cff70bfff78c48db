"""The package's layout keeps what docs/architecture.md says: stages that import only from stages below them, no
import cycle, every module importable on its own, and modules and classes a reader can hold."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.doc_pages import pages, python_blocks, without_blocks_not_run

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lightning_sphere"

#: The stages, lowest first: a module may import its own stage's modules and those of lower stages only.
#: Stages of the same rank (detection, measurement, correction) do not import each other.
STAGES = {
    "core": 0,
    "kernels": 1,
    "detection": 2,
    "measurement": 2,
    "correction": 2,
    "optimizers": 3,
    "tracking": 4,
    "reporting": 5,
    "integrations": 6,
}
#: The package's top-level modules (its ``__init__``, the two callback classes, ``__main__``) sit above all.
TOP = 7
MAX_MODULE_LINES = 450
MAX_CLASS_LINES = 250


def modules() -> dict[str, Path]:
    """Dotted module name → file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def stage_of(module: str) -> tuple[str, int]:
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in STAGES):
        return parts[1], STAGES[parts[1]]
    return "(top)", TOP


def imports(path: Path, module: str, names: dict[str, Path], top_level_only: bool) -> set[str]:
    """The package's modules ``path`` imports (every import statement, or those run at import time only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_sphere"):
            for alias in node.names:  # ``from pkg import submodule`` imports the submodule
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in names else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lightning_sphere")}
    found.discard(module)
    return found


def test_every_module_belongs_to_a_stage():
    unknown = [m for m in modules() if len(m.split(".")) > 2 and m.split(".")[1] not in STAGES]
    assert not unknown, f"modules outside the stages of docs/architecture.md: {unknown}"


def test_stages_import_only_from_stages_below():
    names = modules()
    wrong = []
    for module, path in names.items():
        stage, rank = stage_of(module)
        for imported in imports(path, module, names, top_level_only=False):
            other, other_rank = stage_of(imported)
            if other != stage and other_rank >= rank:
                wrong.append(f"{module} ({stage}) imports {imported} ({other})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_between_modules():
    """Module-level imports form no cycle (a package's ``__init__`` importing its own submodules is not one)."""
    names = modules()
    graph = {m: imports(p, m, names, top_level_only=True) for m, p in names.items()}
    for module, targets in graph.items():  # a module's own package __init__ runs before it: not an edge back
        graph[module] = {t for t in targets if not module.startswith(t + ".")}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle.extend([*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, [*path, nxt]):
                return True
        state[node] = 2
        return False

    for module in sorted(graph):
        if state.get(module) is None and visit(module, [module]):
            break
    assert not cycle, " → ".join(cycle)


def test_every_module_imports_on_its_own():
    """Each module imported first in a fresh set of the package's modules (torch stays loaded): an import order
    that only works from ``lightning_sphere/__init__`` would fail here."""
    script = (
        "import importlib, sys\n"
        "import torch\n"
        f"names = {sorted(modules())!r}\n"
        "failed = []\n"
        "for name in names:\n"
        "    for loaded in [m for m in sys.modules if m == 'lightning_sphere' or m.startswith('lightning_sphere.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as err:\n"
        "        failed.append(f'{name}: {type(err).__name__}: {err}')\n"
        "print('\\n'.join(failed))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "", result.stdout


@pytest.mark.parametrize("module", sorted(modules()))
def test_modules_and_classes_a_reader_can_hold(module):
    path = modules()[module]
    text = path.read_text(encoding="utf-8")
    lines = len(text.splitlines())
    assert lines <= MAX_MODULE_LINES, f"{module}: {lines} lines; split it by responsibility (docs/architecture.md)"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            size = node.end_lineno - node.lineno + 1
            doc = node.body[0] if node.body and isinstance(node.body[0], ast.Expr) else None
            if doc is not None and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
                size -= doc.end_lineno - doc.lineno + 1  # its documentation (a public class's doctest) is no burden
            assert size <= MAX_CLASS_LINES, f"{module}.{node.name}: {size} lines; give part of it to a collaborator"


def test_the_imports_the_documentation_shows_resolve():
    """Every ``from lightning_sphere… import …`` line of a Python block in the README and the docs imports: a module
    that moved cannot leave a snippet behind. Blocks marked ``<!-- not run: … -->`` (an integration that lands
    later) are left out."""
    blocks = [block.code for page in pages() for block in python_blocks(page) if block.not_run is None]
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    statements = [
        line for line in lines if re.match(r"(from lightning_sphere[\w.]* import |import lightning_sphere)", line)
    ]
    assert statements, "no import of lightning_sphere found in the documentation's Python blocks"
    for statement in statements:
        exec(statement, {})


def _resolves(dotted: str) -> bool:
    """Whether ``dotted`` (``lightning_sphere.x.y.Name.attr``) names a module or an attribute of one."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_every_dotted_reference_to_the_package_resolves():
    """Every ``lightning_sphere.…`` the docstrings and the documentation name (Sphinx roles, double backticks,
    Markdown code) is a module or an attribute that exists: a move cannot leave a reference behind."""
    reference = re.compile(r"(?<![\w/])~?(lightning_sphere(?:\.\w+)+)")
    texts = {path: path.read_text(encoding="utf-8") for path in sorted(PACKAGE.rglob("*.py"))}
    texts |= {path: without_blocks_not_run(path.read_text(encoding="utf-8")) for path in pages()}
    dead = sorted(
        {f"{path.relative_to(ROOT)}: {name}" for path, text in texts.items() for name in reference.findall(text)
         if not _resolves(name.rstrip("."))}
    )  # fmt: skip
    assert not dead, "\n".join(dead)


def test_every_file_the_architecture_page_names_exists():
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    files = {path.name for folder in (PACKAGE, ROOT / "tests", ROOT / "benchmarks") for path in folder.rglob("*.py")}
    folders = {path.name for path in PACKAGE.rglob("*") if path.is_dir()}
    named = set(re.findall(r"`(?:[\w/]+/)?(\w+\.py)`", page))
    assert named and named <= files, sorted(named - files)
    named_folders = set(re.findall(r"`(\w+)/`", page))
    assert named_folders <= folders, sorted(named_folders - folders)
