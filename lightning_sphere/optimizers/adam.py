"""torch's Adam and AdamW in the registry: a = m̂, b = √v̂ + ε, AdamW's decoupled decay, their §7 equilibrium, and
the Adam rewrite (docs/theory.md §2.2, §5–§7).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_sphere.correction.adam import AdamRewrite
from lightning_sphere.correction.base import Rewrite
from lightning_sphere.kernels.compiled import host_float
from lightning_sphere.optimizers.equilibrium import angular_update_equilibrium
from lightning_sphere.optimizers.registry import (
    SUPPORTED,
    Moments,
    OptimizerRule,
    ParamGroup,
    _common_refusals,
    register_optimizer,
)


def adam_moments(state: dict[str, Any], group: ParamGroup) -> Moments | None:
    """torch's Adam and AdamW: the running max of ``exp_avg_sq`` with amsgrad, bias corrections as torch
    computes them from the step count (1 − β2^t is small early on)."""
    if "exp_avg" not in state:
        return None
    beta1, beta2 = group["betas"]
    step = state["step"]  # a CPU tensor, or one on the device (capturable, fused): stay there, no sync
    if not isinstance(step, Tensor):
        step = torch.tensor(float(step))
    step = step.to(torch.float32 if step.device.type == "mps" else torch.float64)
    second = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
    return Moments(state["exp_avg"], second, 1 / (1 - beta1**step), (1 - beta2**step).rsqrt())


def _adamw_equilibrium(group: ParamGroup) -> float | None:
    lr, beta1 = host_float(group["lr"]), host_float(group["betas"][0])
    if lr is None or beta1 is None:
        return None
    return angular_update_equilibrium("adamw", lr, group["weight_decay"], beta1)


def _adam_equilibrium(group: ParamGroup) -> float | None:
    return _adamw_equilibrium(group) if _decoupled(group) else None  # L2 decay is rescaled by b: no fixed point


def _decoupled(group: ParamGroup) -> bool:
    return group.get("decoupled_weight_decay", False)


def _adam_correction(name: str) -> Callable[[ParamGroup, str], type[Rewrite]]:
    def correction(group: ParamGroup, mode: str) -> type[Rewrite]:
        _common_refusals(name, group)
        if group["amsgrad"]:
            raise ValueError(f"{name}(amsgrad=True) is not supported; supported: {SUPPORTED}")
        return AdamRewrite

    return correction


register_optimizer(
    torch.optim.Adam,  # ``decoupled_weight_decay=True`` makes it AdamW
    OptimizerRule("Adam", adam_moments, _decoupled, _adam_equilibrium, _adam_correction("Adam"), gradient_intact=True),
)
register_optimizer(
    torch.optim.AdamW,
    OptimizerRule(
        "AdamW", adam_moments, lambda group: True, _adamw_equilibrium, _adam_correction("AdamW"), gradient_intact=True
    ),
)
