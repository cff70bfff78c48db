"""AdamS, AdamSRT, Adam+RT and SGDMRT written from docs/theory.md §6 as plain torch code, for reference.

Each tracked group is a matrix of rows (one row per group); its moments live here, in the authors'
layout: AdamS keeps one scalar second moment per group. Parameters outside the groups are stepped by
the plain torch optimizer with the same hyper-parameters. Nothing here calls lightning_sphere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class Rows:
    """A tracked module: its parameters, and how they read as rows ``(G, d)`` and back."""

    params: Sequence[nn.Parameter]
    to_rows: Callable[[Sequence[Tensor]], Tensor]
    from_rows: Callable[[Tensor], Sequence[Tensor]]
    state: dict[str, Tensor] = field(default_factory=dict)


def conv_rows(conv: nn.Module, bias: bool) -> Rows:
    """One row per output channel: the filter, and its bias entry when it is part of the group."""
    weight = conv.weight
    c = weight.shape[0]
    if not bias:
        return Rows([weight], lambda t: t[0].reshape(c, -1), lambda r: [r.reshape(weight.shape)])
    return Rows(
        [weight, conv.bias],
        lambda t: torch.cat([t[0].reshape(c, -1), t[1][:, None]], 1),
        lambda r: [r[:, :-1].reshape(weight.shape), r[:, -1]],
    )


def dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(1, keepdim=True)


class Reference:
    """One of ``"AdamS"``, ``"AdamSRT"``, ``"Adam+RT"`` (Adam or AdamW) or ``"SGDMRT"`` on ``groups``.

    Args:
        model: the whole model; parameters outside ``groups`` follow ``torch_optimizer``.
        groups: the tracked groups.
        algorithm: which spherical optimizer.
        torch_optimizer: a factory for the plain torch optimizer of the other parameters, which also
            supplies the hyper-parameters (its ``defaults``).
    """

    def __init__(
        self,
        model: nn.Module,
        groups: Sequence[Rows],
        algorithm: str,
        torch_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    ) -> None:
        tracked = {id(p) for g in groups for p in g.params}
        self.rest = torch_optimizer([p for p in model.parameters() if id(p) not in tracked])
        self.hp = self.rest.defaults
        self.decoupled = isinstance(self.rest, torch.optim.AdamW) or self.hp.get("decoupled_weight_decay", False)
        self.groups, self.algorithm = groups, algorithm

    def zero_grad(self) -> None:
        self.rest.zero_grad()
        for g in self.groups:
            for p in g.params:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.rest.step()
        for group in self.groups:
            x = group.to_rows([p.detach() for p in group.params])
            grad = group.to_rows([p.grad for p in group.params])
            x1 = self._sgdmrt(group, x, grad) if self.algorithm == "SGDMRT" else self._adam(group, x, grad)
            for p, value in zip(group.params, group.from_rows(x1), strict=True):
                p.copy_(value)

    def _adam(self, group: Rows, x: Tensor, grad: Tensor) -> Tensor:
        lr, wd, eps = self.hp["lr"], self.hp["weight_decay"], self.hp["eps"]
        beta1, beta2 = self.hp["betas"]
        st = group.state
        standardized = self.algorithm.startswith("AdamS")
        if not st:
            st["t"] = torch.zeros(())
            st["m"] = torch.zeros_like(x)
            st["v"] = torch.zeros(x.shape[0], 1, dtype=x.dtype) if standardized else torch.zeros_like(x)
        p = x
        if self.decoupled:
            x = x * (1 - lr * wd)
        else:
            grad = grad + wd * p  # L2
        st["t"] += 1
        t = st["t"].item()
        st["m"] = beta1 * st["m"] + (1 - beta1) * grad
        # AdamS: v_G ← β2 v_G + (1 − β2) ‖g_G‖²/d, one scalar per group
        square = (grad * grad).mean(1, keepdim=True) if standardized else grad * grad
        st["v"] = beta2 * st["v"] + (1 - beta2) * square
        m_hat, v_hat = st["m"] / (1 - beta1**t), st["v"] / (1 - beta2**t)
        p1 = x - lr * m_hat / (v_hat.sqrt() + eps)
        if self.algorithm.endswith("RT"):
            n1 = dot(p1, p1)
            st["v"] = st["v"] * dot(p, p) / n1
            st["m"] = (dot(p, p1) * st["m"] - dot(st["m"], p1) * p) / n1
        return p1

    def _sgdmrt(self, group: Rows, x: Tensor, grad: Tensor) -> Tensor:
        lr, wd = self.hp["lr"], self.hp["weight_decay"]
        momentum, dampening = self.hp["momentum"], self.hp["dampening"]
        st = group.state
        d_p = grad + wd * x
        st["buf"] = d_p.clone() if "buf" not in st else momentum * st["buf"] + (1 - dampening) * d_p
        p1 = x - lr * st["buf"]
        st["buf"] = (dot(x, p1) * st["buf"] - dot(st["buf"], p1) * x) / dot(p1, p1)
        return p1
