"""The documentation site's pages: every Python block runs (or says why not), and the tables the site generates
from the registries (``docs/hooks/registry_tables.py``, an MkDocs hook) cover them. ``.ci/run`` builds the site
itself with ``mkdocs build --strict``."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.doc_pages import DOCS, ROOT, Block, pages, python_blocks

BLOCKS = [block for page in pages() for block in python_blocks(page)]


def _hook() -> Any:
    spec = importlib.util.spec_from_file_location("registry_tables", DOCS / "hooks" / "registry_tables.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class DocNet(pl.LightningModule):
    """The ``model`` the pages' blocks use: a BatchNorm conv net on random 8×8 images, 4 batches of 16."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        return loader()


def loader() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 8, 8, generator=gen), torch.randint(0, 10, (64,), generator=gen))
    return DataLoader(data, batch_size=16)


class Writer:
    """A stand-in for TensorBoard's ``SummaryWriter``: keeps what it is given."""

    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))


def context() -> dict[str, Any]:
    """The names the pages' blocks take as given (your model, data, optimizer, …), fresh for each block."""
    torch.manual_seed(0)
    model = DocNet()

    class MyMuon(torch.optim.SGD):
        pass

    class MyAdam(torch.optim.Adam):
        pass

    return {
        "model": model,
        "make_model": DocNet,
        "example_batch": torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)),
        "loader": loader(),
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2),
        "loss_fn": F.cross_entropy,
        "writer": Writer(),
        "MyMuon": MyMuon,
        "MyAdam": MyAdam,
    }


@pytest.fixture
def registries() -> Iterator[None]:
    """Blocks that register an optimizer leave the registries as they found them."""
    from lightning_sphere.optimizers import BY_PATH, OPTIMIZERS

    by_class, by_path = dict(OPTIMIZERS), dict(BY_PATH)
    yield
    OPTIMIZERS.clear()
    OPTIMIZERS.update(by_class)
    BY_PATH.clear()
    BY_PATH.update(by_path)


def test_the_pages_have_python_blocks():
    assert len(BLOCKS) >= 10
    assert any(block.page.name == "README.md" for block in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b.page.relative_to(ROOT)}:{b.line}")
def test_every_python_block_runs(block: Block, tmp_path, monkeypatch, registries):
    """Each block runs as written, in a namespace holding only the objects it takes as given; one that cannot run
    here is marked ``<!-- not run: REASON -->`` with a reason."""
    if block.not_run is not None:
        assert len(block.not_run.split()) >= 3, "say why the block does not run"
        pytest.skip(f"not run: {block.not_run}")
    monkeypatch.chdir(tmp_path)  # Trainer and TensorBoard write their folders here
    namespace = context()
    exec(compile(block.code, f"{block.page.relative_to(ROOT)}:{block.line}", "exec"), namespace)


def test_the_site_lists_every_page():
    """Every Markdown page under docs/ is in the navigation (a page outside it is unreachable), and every page the
    navigation names exists."""

    def names(node: Any) -> Iterator[str]:
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for item in node:
                yield from names(item)
        elif isinstance(node, dict):
            for value in node.values():
                yield from names(value)

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    assert config["docs_dir"] == "docs"
    listed = set(names(config["nav"]))
    on_disk = {path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md")}
    assert listed == on_disk


def test_the_generated_metrics_table_covers_the_registry():
    from lightning_sphere import METRICS
    from lightning_sphere.measurement.metrics import SKIPPED_GROUPS

    table = _hook().metrics_table()
    names = re.findall(r"^\| `(\w+)`", table, flags=re.M)
    assert names == [*METRICS, SKIPPED_GROUPS]
    for name, metric in METRICS.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{name}` |"))
        assert f"| {metric.unit} |" in row and f"| {metric.section} |" in row, name


def test_the_generated_optimizer_table_covers_the_registry():
    """One row (at least) per registered class; the cells are the registry's answers: AdamW's equilibrium at
    lr 1e-3 and λ 0.1 is √(2ηλ(1 − β1)/(1 + β1)) (§7), SGD-M's "srt" is SGDMRT, Nesterov's nothing."""
    from lightning_sphere.optimizers import BY_PATH, OPTIMIZERS, class_path

    table = _hook().optimizers_table()
    rows = table.splitlines()[2:]
    paths = {re.match(r"\| `([\w.]+)`", row)[1] for row in rows}  # type: ignore[index]
    assert paths == {class_path(cls) for cls in OPTIMIZERS} | set(BY_PATH)
    adamw = next(row for row in rows if row.startswith("| `torch.optim.AdamW` |"))
    assert f"| {(2 * 1e-3 * 0.1 * 0.1 / 1.9) ** 0.5:.4g} |" in adamw
    momentum = next(row for row in rows if "momentum=0.9, weight_decay" in row)
    assert "`MomentumRewrite`" in momentum
    nesterov = next(row for row in rows if "nesterov=True" in row)
    assert "Rewrite" not in nesterov


def test_the_reference_pages_hold_the_generated_tables():
    hook = _hook()
    for page, name in (("reference/metrics.md", "metrics"), ("reference/optimizers.md", "optimizers")):
        text = (DOCS / page).read_text(encoding="utf-8")
        assert f"<!-- generated: {name} -->" in text, page
        assert hook.expand(text).count("\n| ") > 5, page


def test_the_docstrings_roles_render_as_code():
    rendered = ":data:<code>~lightning_sphere.METRICS</code> and :mod:<code>lightning_sphere.correction</code>"
    assert _hook().roles_as_code(rendered) == "<code>METRICS</code> and <code>lightning_sphere.correction</code>"
