"""torch's Adafactor in the registry (Shazeer & Stern, arXiv 1804.04235), docs/theory.md §8.4.

torch's ``Adafactor`` steps x ← (1 − ηλ) x − α u / max(1, RMS(u)/d): u the gradient over a factored second moment,
clipped to an RMS of at most d, scaled by the relative step α = max(ε₂, RMS(x_k)) · min(η, 1/√t). The update of a
whole tensor is then at most min(η, 1/√t) · d times its norm (while RMS(x_k) ≥ ε₂): the charts' tangential update of
a layer-level group stays under that bound, and reaches it while the clipping acts. ``update_scale`` of such a group
is the measured update over the bound (1 while clipping; an unclipped, Adam-like step reads less). A relative step
sets the angle directly, whatever the weights' norm, so weight decay does not set it and no §7 equilibrium is
logged; the effective learning rate is the measured one.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_sphere.core.groups import InvariantGroups
from lightning_sphere.kernels.compiled import host_float
from lightning_sphere.optimizers.registry import OptimizerRule, ParamGroup, register_optimizer


def _relative_bound(group: ParamGroup, entry: InvariantGroups, state: dict[str, Any]) -> tuple[float, float] | None:
    """min(η, 1/√t) · d per unit of r_k, for a group that is a whole tensor (the clipping acts per tensor); ``None``
    for a group of some rows of one (its share of the clipped update is not bounded alone)."""
    lr, step = host_float(group["lr"]), host_float(state.get("step"))
    if len(entry.slices) != 1 or entry.num_groups != 1 or lr is None or not step:
        return None
    return 0.0, min(lr, 1 / math.sqrt(step)) * group["d"]


register_optimizer(
    torch.optim.Adafactor,
    OptimizerRule(
        "Adafactor",
        decoupled_decay=lambda group: True,
        formula=False,
        gradient_intact=True,
        update_length=_relative_bound,
    ),
)
