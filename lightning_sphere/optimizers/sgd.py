"""torch's SGD in the registry: b ≡ 1, its §7 equilibrium with and without momentum, and which rewrite applies
(SGDMRT with momentum, the AdamG rewrite without; docs/theory.md §2.1, §4, §6–§7).
"""

from __future__ import annotations

import torch

from lightning_sphere.correction.adamg import AdamGRewrite
from lightning_sphere.correction.base import Rewrite
from lightning_sphere.correction.momentum import MomentumRewrite
from lightning_sphere.kernels.compiled import host_float
from lightning_sphere.optimizers.equilibrium import angular_update_equilibrium
from lightning_sphere.optimizers.registry import (
    SUPPORTED,
    OptimizerRule,
    ParamGroup,
    _common_refusals,
    register_optimizer,
)


def _sgd_equilibrium(group: ParamGroup) -> float | None:
    lr = host_float(group["lr"])
    if lr is None or group["nesterov"]:
        return None
    return angular_update_equilibrium("sgd", lr, group["weight_decay"], group["momentum"], group["dampening"])


def _sgd_correction(group: ParamGroup, mode: str) -> type[Rewrite]:
    _common_refusals("SGD", group)
    if group["nesterov"]:
        raise ValueError(f"SGD(nesterov=True) is not supported; supported: {SUPPORTED}")
    if group["momentum"] == 0:
        if mode != "srt":
            raise ValueError(f"mode {mode!r} has no meaning for SGD without momentum (no moment to rescale); use 'srt'")
        return AdamGRewrite
    if mode == "s":
        raise ValueError("mode 's' has no meaning for SGD with momentum (no second moment); use 'srt' or 'rt'")
    return MomentumRewrite


register_optimizer(
    torch.optim.SGD,
    OptimizerRule(
        "SGD",
        equilibrium=_sgd_equilibrium,
        correction=_sgd_correction,
        gradient_intact=True,
        decay_momentum=lambda group: (group["momentum"], group["dampening"], group["nesterov"]),
    ),
)
