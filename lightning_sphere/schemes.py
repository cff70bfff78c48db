"""How each torch optimizer reads in the paper's generic scheme ``x_{k+1} = x_k − η a ⊘ b`` (THEORY.md §2).

Only the exact classes below are mapped: a subclass may change its step, and a wrong ``b`` would give
a silently wrong effective learning rate, so every other optimizer gets the measured one (§3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_sphere.geometry import angular_update_equilibrium


@dataclass(frozen=True)
class Scheme:
    """One parameter group's optimizer, seen through §2.

    Attributes:
        name: ``"sgd"`` (with or without momentum), ``"adam"`` (L2 decay), ``"adamw"`` (decoupled
            decay) or ``"other"``.
        formula: the effective learning rate ``η/(r_k r_{k+1} rms(b))`` applies (§3); otherwise the
            measured ``sin θ_k / ‖∇L(u_k)‖`` is reported.
        adaptive: ``a`` and ``b`` come from Adam's state (§5 diagnostics apply).
        equilibrium: the §7 angular update for this group's hyper-parameters, ``None`` where none exists.
    """

    name: str
    formula: bool
    adaptive: bool
    equilibrium: float | None


def scheme_of(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> Scheme:
    """The scheme of one parameter group of ``optimizer``."""
    kind = type(optimizer)
    lr, decay = _host_float(group.get("lr")), group.get("weight_decay", 0.0)
    if kind is torch.optim.SGD:
        momentum = group["momentum"]
        plain = lr is not None and not group["nesterov"]
        eq = angular_update_equilibrium("sgd", lr, decay, momentum, group["dampening"]) if plain else None
        return Scheme("sgd", formula=True, adaptive=False, equilibrium=eq)
    if kind is torch.optim.AdamW or (kind is torch.optim.Adam and group.get("decoupled_weight_decay", False)):
        eq = angular_update_equilibrium("adamw", lr, decay, _host_float(group["betas"][0])) if lr is not None else None
        return Scheme("adamw", formula=True, adaptive=True, equilibrium=eq)
    if kind is torch.optim.Adam:
        return Scheme("adam", formula=True, adaptive=True, equilibrium=None)
    return Scheme("other", formula=False, adaptive=False, equilibrium=None)


def adam_terms(state: dict[str, Any], group: dict[str, Any]) -> tuple[Tensor, Tensor] | None:
    """Adam's ``a = m̂_k`` and ``b = sqrt(v̂_k) + ε`` after the step (§2), as torch computed them.

    ``None`` when the parameter has no Adam state yet (it was never stepped).
    """
    if "exp_avg" not in state:
        return None
    beta1, beta2 = group["betas"]
    # float64 bias corrections, as torch computes them from a Python step count: 1 − β2^t is small early on.
    step = torch.as_tensor(
        state["step"], dtype=torch.float32 if state["exp_avg"].device.type == "mps" else torch.float64
    )
    second = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
    a = state["exp_avg"] / (1 - beta1**step)
    b = second.sqrt() / (1 - beta2**step).sqrt() + group["eps"]
    return a, b


def _host_float(value: Any) -> float | None:
    """A hyper-parameter as a Python float without a device sync; ``None`` for one held on a device."""
    if isinstance(value, Tensor):
        return float(value) if value.device.type == "cpu" else None
    return None if value is None else float(value)
