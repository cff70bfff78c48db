"""The plain optimizer's step, taken on copies: the ground truth for every row a correction must leave alone."""

from __future__ import annotations

import copy
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor


def plain_step(optimizer: torch.optim.Optimizer) -> dict[Tensor, tuple[Tensor, dict[str, Tensor]]]:
    """What ``optimizer``'s next step does from the current weights, gradients and state, uncorrected: a
    fresh optimizer of the same class (no hooks) over copies, loaded with a copy of its state and stepped.

    Returns:
        parameter → (its value after the plain step, its state tensors after it).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    copies = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    for c, p in zip(copies, params, strict=True):
        c.grad = None if p.grad is None else p.grad.detach().clone()
    groups, start = [], 0
    for group in optimizer.param_groups:
        n = len(group["params"])
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": copies[start : start + n]})
        start += n
    twin = type(optimizer)(groups)
    twin.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    twin.step()
    return {
        p: (c.detach(), {k: v for k, v in twin.state.get(c, {}).items() if isinstance(v, Tensor)})
        for p, c in zip(params, copies, strict=True)
    }


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality, NaN included."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _bits(t: Tensor) -> Tensor:
    return t.detach().contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


class PlainTwin(pl.Callback):
    """In a Trainer: before every optimizer step, the plain step on copies (:func:`plain_step`); after the
    batch, what the step really did. ``steps[i]`` is ``(plain, before, after)`` for the i-th step, each
    parameter → (value, state tensors)."""

    def __init__(self) -> None:
        self.steps: list[tuple[Any, Any, Any]] = []
        self._pending: list[tuple[torch.optim.Optimizer, Any, Any]] = []

    @staticmethod
    def _now(optimizer: torch.optim.Optimizer) -> dict[Tensor, tuple[Tensor, dict[str, Tensor]]]:
        return {
            p: (
                p.detach().clone(),
                {k: v.clone() for k, v in optimizer.state.get(p, {}).items() if isinstance(v, Tensor)},
            )
            for group in optimizer.param_groups
            for p in group["params"]
        }

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._pending.append((optimizer, plain_step(optimizer), self._now(optimizer)))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        for optimizer, plain, before in self._pending:
            self.steps.append((plain, before, self._now(optimizer)))
        self._pending.clear()
