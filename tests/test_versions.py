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
import torch

from lightning_sphere.core import compat

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lightning_sphere"


def release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.match(r"\d+(\.\d+)*", version).group().split("."))  # type: ignore[union-attr]


def floors() -> dict[str, str]:
    """The lower bounds pyproject.toml puts on Python, torch and Lightning."""
    text = (ROOT / "pyproject.toml").read_text()
    found = {"python": re.search(r'requires-python = ">=([\d.]+)"', text).group(1)}  # type: ignore[union-attr]
    for name in ("torch", "pytorch-lightning"):
        found[name] = re.search(rf'"{name}>=([\d.]+),', text).group(1)  # type: ignore[union-attr]
    return found


@pytest.mark.parametrize("path", list(compat.GATED))
def test_each_gated_api_is_there_exactly_from_its_release(path):
    gated = compat.GATED[path]
    running = release(torch.__version__)
    assert release(gated.since) > release(floors()["torch"])  # else it needs no gate
    if running >= release(gated.since):
        assert compat.resolve(path) is not None and compat.api(path) is compat.resolve(path)
    else:  # an older torch (the floor job): absent where listed, and the fallback is where it says
        assert compat.resolve(path) is None
        assert (compat.api(path) is not None) == (gated.before is not None)


def test_an_api_not_listed_is_refused():
    with pytest.raises(KeyError):
        compat.api("torch.optim.SGD")


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
    # Every use goes through compat.api, so that an older torch gets the fallback and the list stays complete.
    gated = set(compat.GATED) | {g.before for g in compat.GATED.values() if g.before}
    modules = {path.rsplit(".", 1)[0] for path in gated}  # importing the module that holds one is a use too
    found = []
    for file in sorted(PACKAGE.rglob("*.py")):
        if file.name == "compat.py":
            continue
        for line, name in dotted_uses(ast.parse(file.read_text())):
            if name in gated or (name in modules and name.startswith("torch.distributed.")):
                found.append(f"{file.relative_to(ROOT)}:{line}: {name}")
    assert found == []


def test_the_readme_states_the_floors_of_pyproject():
    stated = floors()
    readme = (ROOT / "README.md").read_text()
    for name, label in (("python", "Python"), ("torch", "torch"), ("pytorch-lightning", "Lightning")):
        assert f"{label} ≥ {stated[name]}" in readme, name
    development = (ROOT / "docs" / "development.md").read_text()
    for gated in compat.GATED.values():  # the list the docs give, with the releases
        assert f"`{gated.path}` ({gated.since})" in development, gated.path


SIMULATED_OLD_TORCH = """
import torch
for owner, name in ((torch.compiler, "set_stance"), (torch.optim, "Muon"), (torch.optim, "Adafactor")):
    delattr(owner, name)
import lightning_sphere
from lightning_sphere import SphereTracker, find_invariant_groups
from lightning_sphere.optimizers import registry

assert not {cls.__name__ for cls in registry.OPTIMIZERS} & {"Muon", "Adafactor"}, registry.OPTIMIZERS
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                            torch.nn.Linear(144, 3)).double()
x, y = torch.randn(8, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (8,))
groups = find_invariant_groups(model, x)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
tracker = SphereTracker(groups, [optimizer])
tracker.arm()
torch.nn.functional.cross_entropy(model(x), y).backward()
optimizer.step()
print(sorted(tracker.collect().scalars)[:2], [g.module_name for g in groups])
try:
    find_invariant_groups(torch.compile(model), x)
except ValueError as error:
    print("refused:", error)
"""


def test_the_package_works_on_a_torch_without_the_gated_apis():
    """torch 2.4 and 2.5 lack set_stance (and Muon, Adafactor): the package imports, measures an uncompiled model,
    and refuses a compiled one with the release to install, where it used to fail at import (Muon's registry
    entry) or with an AttributeError at the first step."""
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(SIMULATED_OLD_TORCH)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    first, refused = run.stdout.strip().splitlines()
    assert first == "['sphere/angular_update/0', 'sphere/angular_update/all'] ['0']"
    assert refused.startswith("refused: find_invariant_groups: a torch.compile'd model needs torch >= 2.6")
    assert f"this is torch {torch.__version__}" in refused


def test_a_compiled_model_is_refused_at_fit_start_on_an_older_torch(monkeypatch, tmp_path):
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    from lightning_sphere import SphereMonitor
    from tests.lightning_helpers import Net, fit

    monkeypatch.delattr(torch.compiler, "set_stance")
    module = Net()
    module.net = torch.compile(module.net)
    with pytest.raises(MisconfigurationException, match=r"SphereMonitor: a torch.compile'd model needs torch >= 2.6"):
        fit(module, tmp_path, [SphereMonitor()], max_steps=1)
    fit(Net(), tmp_path, [SphereMonitor()], max_steps=1)  # uncompiled: monitored as on a newer torch
