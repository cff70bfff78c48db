"""The versions the package claims: every API newer than the torch floor is listed in ``core/compat.py`` (checked
against the running torch and the package's own source), the floors the README states are pyproject's, and the
package imports and measures on a torch that lacks every listed API (simulated here; ``.ci/versions`` runs the
suite on the real floor and the newest releases)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lightning_sphere.core import compat

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lightning_sphere"


def floors() -> dict[str, str]:
    """The lower bounds pyproject.toml puts on Python, torch, Lightning and tensorboard."""
    text = (ROOT / "pyproject.toml").read_text()
    found = {"python": re.search(r'requires-python = ">=([\d.]+)"', text).group(1)}  # type: ignore[union-attr]
    for name in ("torch", "pytorch-lightning", "tensorboard"):
        found[name] = re.search(rf'"{name}>=([\d.]+)', text).group(1)  # type: ignore[union-attr]
    return found


def test_the_floor_in_the_code_is_pyprojects():
    assert floors()["torch"] == compat.TORCH_FLOOR
    floor = (ROOT / ".ci" / "floor.txt").read_text()  # what .ci/versions tries as the floor
    for name in ("torch", "pytorch-lightning", "tensorboard"):
        assert re.search(rf"^{name}=={re.escape(floors()[name])}(\.0)?$", floor, re.M), name


@pytest.mark.parametrize("key", list(compat.GATED))
def test_each_gated_feature_is_there_exactly_from_its_release(key):
    gated = compat.GATED[key]
    assert compat.release(gated.since) > compat.release(compat.TORCH_FLOOR)  # else it needs no gate
    newer = compat.release() >= compat.release(gated.since)
    assert compat.supported(key) == newer
    if gated.path is not None:  # the API is there exactly from its release (on the floor job: absent)
        assert (compat.resolve(gated.path) is not None) == newer
        assert compat.api(key) is (compat.resolve(gated.path) if newer else None)
    if not newer:
        assert compat.refusal(key).startswith(f"{gated.name} needs torch >= {gated.since}")


def test_an_unlisted_feature_is_refused():
    with pytest.raises(KeyError):
        compat.supported("torch.optim.SGD")


def dotted_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """Every ``torch.…`` name the code imports or reads (not in strings, not under ``if TYPE_CHECKING``)."""
    uses: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module:
            uses.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
            uses.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            uses.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.Attribute):
            text = ast.unparse(node)
            if re.fullmatch(r"torch(\.\w+)+", text):
                uses.append((node.lineno, text))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return uses


def test_no_gated_api_is_reached_outside_compat():
    # Every use goes through compat, so that an older torch gets the fallback and the list stays complete.
    gated = {g.path for g in compat.GATED.values() if g.path}
    found = []
    for file in sorted(PACKAGE.rglob("*.py")):
        if file.name == "compat.py":
            continue
        for line, name in dotted_uses(ast.parse(file.read_text())):
            if name in gated:
                found.append(f"{file.relative_to(ROOT)}:{line}: {name}")
    assert found == []


def test_the_readme_states_the_floors_of_pyproject():
    stated = floors()
    readme = (ROOT / "README.md").read_text()
    for name, label in (("python", "Python"), ("torch", "torch"), ("pytorch-lightning", "Lightning")):
        assert f"{label} ≥ {stated[name]}" in readme, name
    development = (ROOT / "docs" / "development.md").read_text()
    for gated in compat.GATED.values():  # the docs list every gated feature with its release
        assert f"{gated.name} (torch ≥ {gated.since})" in development, gated.name


SIMULATED_OLD_TORCH = """
import torch
del torch.optim.Muon
import lightning_sphere
from lightning_sphere import SphereTracker, find_invariant_groups
from lightning_sphere.optimizers import registry

assert "Muon" not in {cls.__name__ for cls in registry.OPTIMIZERS}, registry.OPTIMIZERS
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                            torch.nn.Linear(144, 3)).double()
x, y = torch.randn(8, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (8,))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
tracker = SphereTracker(find_invariant_groups(model, x), [optimizer])
tracker.arm()
torch.nn.functional.cross_entropy(model(x), y).backward()
optimizer.step()
print(sorted(tracker.collect().scalars)[:2])
"""


@pytest.mark.skipif(not compat.supported("muon"), reason="the running torch has no Muon to take away")
def test_the_package_works_on_a_torch_without_muon():
    """torch 2.6–2.8 have no torch.optim.Muon: the package imports (its registry entry used to fail at import) and
    measures."""
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(SIMULATED_OLD_TORCH)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "['sphere/angular_update/0', 'sphere/angular_update/all']"
