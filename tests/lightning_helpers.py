"""A small BatchNorm model as a LightningModule, an in-memory logger, and a callback that captures what
each optimizer step did (x_k, x_{k+1}, the gradient it used, the lr in force) for reference checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

from tests import reference
from tests.conftest import bn_net

#: Tracked modules of ``bn_net`` inside ``Net`` (module name → index), and whether the bias joins.
TRACKED = {"net.0": (0, False), "net.3": (3, True)}


def dataset(n: int = 64, dtype: torch.dtype = torch.float64) -> TensorDataset:
    gen = torch.Generator().manual_seed(2)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=gen, dtype=dtype), torch.randint(0, 10, (n,), generator=gen))


def sgd_momentum(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2)


class Net(pl.LightningModule):
    """``bn_net`` trained on random 8×8 images; the optimizer comes from a factory."""

    def __init__(
        self,
        optimizer: Callable[[Any], Any] = sgd_momentum,
        dtype: torch.dtype = torch.float64,
        eps: float = 1e-5,
        batch_size: int = 16,
    ) -> None:
        super().__init__()
        self.net = bn_net(dtype, eps)
        self.make_optimizer = optimizer
        self.dtype_ = dtype
        self.batch_size = batch_size

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return self.make_optimizer(self.parameters())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(dataset(dtype=self.dtype_), batch_size=self.batch_size)


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.history.append((step, dict(metrics)))

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def sphere(self) -> dict[int, dict[str, float]]:
        """The monitor's records, by step."""
        return {step: m for step, m in self.history if any(k.startswith("sphere/") for k in m)}


def group_rows(layer: torch.nn.Module, bias: bool, tensor_of: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    parts = [reference.rows(tensor_of(layer.weight))]
    if bias:
        parts.append(tensor_of(layer.bias).detach().to(torch.float64, copy=True)[:, None])
    return torch.cat(parts, 1)


class Capture(pl.Callback):
    """Per optimizer step (in order): rows of x_k, x_{k+1}, the gradient the update used, and the lr.

    The gradient is copied when the update is about to consume it: right after the step's closure (Lightning's
    training step, backward and clipping; its first call, for LBFGS), or in the step pre-hook for a step given
    no closure (AMP) — after anything that changes it on the way, before the optimizer may change it."""

    def __init__(self, tracked: dict[str, tuple[int, bool]] = TRACKED) -> None:
        self.tracked = tracked
        self.steps: list[dict[str, dict[str, Any]]] = []
        self._before: dict[str, torch.Tensor] = {}
        self._grads: dict[str, torch.Tensor] | None = None

    def _layers(self, pl_module: pl.LightningModule) -> dict[str, tuple[torch.nn.Module, bool]]:
        modules = dict(pl_module.named_modules())
        return {name: (modules[name], bias) for name, (_, bias) in self.tracked.items()}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layers = self._layers(pl_module)

        def grads() -> None:
            if self._grads is None:
                self._grads = {
                    n: group_rows(m, b, lambda t: t.grad) for n, (m, b) in layers.items() if m.weight.grad is not None
                }

        def before(optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            self._before = {n: group_rows(m, b, lambda t: t) for n, (m, b) in layers.items()}
            self._grads = None
            closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
            if closure is None:
                grads()
                return None

            def closure_then_copy(*a: Any, **k: Any) -> Any:
                result = closure(*a, **k)
                grads()
                return result

            if "closure" in kwargs:
                return args, {**kwargs, "closure": closure_then_copy}
            return (args[0], closure_then_copy, *args[2:]), kwargs

        def after(optimizer: Any, *args: Any) -> None:
            record = {}
            for name, (module, bias) in layers.items():
                group = next((g for g in optimizer.param_groups if any(p is module.weight for p in g["params"])), None)
                if group is None or name not in (self._grads or {}):  # another optimizer's module, or not used
                    continue
                record[name] = {
                    "x0": self._before[name],
                    "x1": group_rows(module, bias, lambda t: t),
                    "grad": self._grads[name],
                    "lr": group["lr"],
                }
            self.steps.append(record)

        for optimizer in trainer.optimizers:
            optimizer.register_step_pre_hook(before)
            optimizer.register_step_post_hook(after)


def expected(record: dict[str, dict[str, Any]], measured: bool = False) -> dict[str, float]:
    """The monitor's scalars for one captured step (SGD family, or the measured effective lr)."""
    per_layer = {
        name: reference.group_metrics(r["x0"], r["x1"], r["grad"], r["lr"], measured=measured)
        for name, r in record.items()
    }
    out = {}
    for metric in per_layer[next(iter(per_layer))]:
        values = {name: m[metric] for name, m in per_layer.items()}
        values["all"] = torch.cat(list(values.values()))
        for name, v in values.items():
            out[f"sphere/{metric}/{name}"] = reference.summarize(v, reference.REDUCE[metric])
    return out


def assert_scalars_match(got: dict[str, float], want: dict[str, float], rel: float = 1e-9, abs: float = 1e-12) -> None:
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=rel, abs=abs), key


def fit(
    module: pl.LightningModule, tmp_path: Any, callbacks: list[Any], trainer_cls: type = pl.Trainer, **kwargs: Any
) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        max_steps=4,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
        logger=MemoryLogger(),
    )
    options.update(kwargs)
    trainer = trainer_cls(callbacks=callbacks, **options)
    trainer.fit(module)
    return trainer
