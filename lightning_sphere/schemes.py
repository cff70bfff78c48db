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


def adam_state(state: dict[str, Any], group: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """Adam's moments after the step and its bias corrections: ``(m, v, 1/(1 − β1^t), 1/√(1 − β2^t))``.

    Then a = m̂_k = m/(1 − β1^t) and b = √v̂_k + ε = √v/√(1 − β2^t) + ε (§2), as torch computes them; ``v``
    is the running max with amsgrad. The corrections are 0-dim float64 tensors, computed like torch's from
    the step count (1 − β2^t is small early on). ``None`` when the parameter was never stepped.
    """
    if "exp_avg" not in state:
        return None
    beta1, beta2 = group["betas"]
    step = state["step"]  # a CPU tensor, or one on the device (capturable, fused): stay there, no sync
    if not isinstance(step, Tensor):
        step = torch.tensor(float(step))
    step = step.to(torch.float32 if step.device.type == "mps" else torch.float64)
    second = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
    return state["exp_avg"], second, 1 / (1 - beta1**step), (1 - beta2**step).rsqrt()


def _host_float(value: Any) -> float | None:
    """A hyper-parameter as a Python float without a device sync; ``None`` for one held on a device."""
    if isinstance(value, Tensor):
        return float(value) if value.device.type == "cpu" else None
    return None if value is None else float(value)
