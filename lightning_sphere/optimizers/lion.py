"""Lion in the registry (Chen et al., arXiv 2302.06675; the ``lion-pytorch`` package), docs/theory.md §8.3.

Lion steps x ← (1 − ηλ) x − η sign(c), c = β1 m + (1 − β1) g, then m ← β2 m + (1 − β2) g. Every entry moves by η:
a group of d entries moves by exactly η √d per step (``update_scale`` reads 1 up to the entries whose c is
exactly zero). The step is not the §2 scheme (the sign is not a preconditioner of the gradient), so the effective
learning rate is the measured one. With the decoupled decay the angular update settles at √(2ηλ / F), F the sum
over lags of the correlation of successive sign vectors: (2/π) arcsin of the filter's correlation for Gaussian c
(our derivation, §8.3); Kosson et al. (arXiv 2305.17212) give its small-correlation limit √(π/2)·√(2ηλ Σc²).
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import lru_cache
from typing import Any

import torch

from lightning_sphere.core.groups import InvariantGroups
from lightning_sphere.kernels.compiled import host_float
from lightning_sphere.optimizers.equilibrium import filtered_update_equilibrium
from lightning_sphere.optimizers.registry import OptimizerRule, ParamGroup, register_optimizer


@lru_cache(maxsize=64)
def sign_filter_ratio(beta1: float, beta2: float) -> float:
    """1/F for Lion's update sign(c_t), c_t = Σ_j c_j g_{t−j} with c_0 = 1 − β1, c_j = β1(1 − β2)β2^{j−1}: F =
    1 + (4/π) Σ_{k≥1} arcsin(r_k), r_k = r_1 β2^{k−1} the lag-k correlation of c for white gradients (sign of
    jointly Gaussian entries, Sheppard's formula)."""
    head, tail = 1 - beta1, beta1 * (1 - beta2)
    if tail == 0:  # no memory: successive signs are independent
        return 1.0
    energy = head**2 + tail**2 / (1 - beta2**2)
    r = (head * tail + tail**2 * beta2 / (1 - beta2**2)) / energy
    total, k = 0.0, 0
    while r > 1e-13 and k < 10**7:
        total += math.asin(min(r, 1.0))
        r *= beta2
        k += 1
    return 1 / (1 + 4 / math.pi * total)


def lion_rule(name: str = "Lion", weight_decay: Any = None) -> OptimizerRule:
    """The registry entry of a Lion: decoupled decay (1 − ηλ) per step, λ read by ``weight_decay(param_group)``
    (the group's ``weight_decay`` by default)."""
    read_decay = weight_decay or (lambda group: group.get("weight_decay", 0.0))

    def equilibrium(group: ParamGroup) -> float | None:
        lr, decay = host_float(group["lr"]), host_float(read_decay(group))
        beta1, beta2 = (host_float(b) for b in group["betas"])
        if lr is None or decay is None or beta1 is None or beta2 is None:
            return None
        return filtered_update_equilibrium(lr * decay, sign_filter_ratio(beta1, beta2))

    def update_length(group: ParamGroup, entry: InvariantGroups, state: dict[str, Any]) -> tuple[float, float] | None:
        lr = host_float(group["lr"])
        return None if lr is None else (lr * math.sqrt(entry.group_size), 0.0)

    return OptimizerRule(
        name,
        decoupled_decay=lambda group: True,
        equilibrium=equilibrium,
        formula=False,
        gradient_intact=True,
        update_length=update_length,
        weight_decay=read_decay,
    )


def _lion_pytorch(optimizer: torch.optim.Optimizer) -> OptimizerRule:
    """lion-pytorch's ``decoupled_weight_decay=True`` decays by ηλ/η_0 per step (η_0 its initial learning rate)."""
    if getattr(optimizer, "decoupled_wd", False):
        initial = optimizer._init_lr  # type: ignore[attr-defined]
        return lion_rule("Lion", lambda group: group.get("weight_decay", 0.0) / initial)
    return LION


LION = lion_rule()
register_optimizer("lion_pytorch.lion_pytorch.Lion", replace(LION, specialize=_lion_pytorch))
