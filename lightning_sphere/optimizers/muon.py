"""Muon in the registry: torch's ``torch.optim.Muon``, and one call for other implementations (docs/theory.md §8.2).

Muon orthogonalizes a momentum of the gradient of each 2-D weight, O = NS(U) ≈ U(UᵀU)^{-1/2} by a few
Newton–Schulz iterations (Jordan et al., the Muon blog post; Liu et al., arXiv 2502.16982 for the RMS-matched
variant), and steps x ← (1 − ηλ) x − η s O: the decoupled decay with the scheduled η, the update with η times the
shape's adjustment s. Its step is not the §2 scheme, so the effective learning rate is the measured one; what the
hyper-parameters predict is the update's length and the equilibrium:

- an orthogonal O (A × B, A rows) has ‖O‖_F² = min(A, B), its rows norm 1 when A ≤ B and √(B/A) on average when
  A > B: a group of ρ rows moves by η s √(ρ min(A, B)/A) per step (``update_scale`` is the measured length over
  this: the RMS of the singular values Newton–Schulz reaches, about 0.9, and anything that rescaled the update —
  a clipping of the orthogonalized update, a scheduler writing another lr — shows there);
- with decoupled decay the angular update settles at √(2ηλ · Σc²/(Σc)²), c the filter that makes U of the
  gradients: (1 − μ)/(1 + μ) for plain momentum, (1 − μ)²((1 + μ)² + μ⁴/(1 − μ²)) with Nesterov (our
  derivation, §8.2; s cancels out: it only scales the norm the weights settle at).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from lightning_sphere.core.compat import api
from lightning_sphere.core.groups import InvariantGroups
from lightning_sphere.kernels.compiled import host_float
from lightning_sphere.optimizers.equilibrium import filtered_update_equilibrium
from lightning_sphere.optimizers.registry import OptimizerRule, ParamGroup, register_optimizer


def muon_filter_ratio(momentum: float, nesterov: bool) -> float:
    """Σc²/(Σc)² of the filter U_t = Σ_j c_j g_{t−j} Muon orthogonalizes: its momentum buffer B ← μB + (1 − μ)g, and
    with Nesterov U = (1 − μ)g + μB (torch's ``grad.lerp(buf, μ)``)."""
    mu = momentum
    if not nesterov:
        return (1 - mu) / (1 + mu)
    return (1 - mu) ** 2 * ((1 + mu) ** 2 + mu**4 / (1 - mu**2))


def torch_lr_ratio(group: ParamGroup, shape: tuple[int, ...]) -> float:
    """torch's adjustment s of Muon's learning rate for an A × B weight: ``"original"`` (the default)
    √max(1, A/B), ``"match_rms_adamw"`` 0.2 √max(A, B) (Liu et al., arXiv 2502.16982)."""
    rows, columns = shape[0], math.prod(shape[1:])
    if group.get("adjust_lr_fn") == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, columns))
    return math.sqrt(max(1.0, rows / columns))


def muon_rule(
    name: str,
    *,
    momentum: Callable[[ParamGroup], float] = lambda group: group["momentum"],
    nesterov: Callable[[ParamGroup], bool] = lambda group: group.get("nesterov", True),
    lr_ratio: Callable[[ParamGroup, tuple[int, ...]], float] = torch_lr_ratio,
    gradient_intact: bool = True,
) -> OptimizerRule:
    """The registry entry of a Muon: how to read its momentum, whether it is Nesterov's, and its learning-rate
    adjustment for a weight's shape. Its decoupled decay must use the unadjusted η (``weight_decay`` in the param
    group), as torch's and Jordan's do."""

    def equilibrium(group: ParamGroup) -> float | None:
        lr, decay = host_float(group["lr"]), host_float(group.get("weight_decay", 0.0))
        if lr is None or decay is None:
            return None
        return filtered_update_equilibrium(lr * decay, muon_filter_ratio(momentum(group), nesterov(group)))

    def update_length(group: ParamGroup, entry: InvariantGroups, state: dict[str, Any]) -> tuple[float, float] | None:
        lr = host_float(group["lr"])
        piece = entry.slices[0]
        if lr is None or len(entry.slices) != 1 or piece.param.dim() != 2 or piece.channel_dims not in ((0,), ()):
            return None
        rows, columns = piece.param.shape
        per_group = rows if piece.channel_dims == () else piece.num_channels // entry.num_groups
        length = lr * lr_ratio(group, tuple(piece.param.shape)) * math.sqrt(per_group * min(rows, columns) / rows)
        return length, 0.0

    return OptimizerRule(
        name,
        decoupled_decay=lambda group: True,
        equilibrium=equilibrium,
        formula=False,
        gradient_intact=gradient_intact,
        update_length=update_length,
    )


def register_muon(optimizer_class: type[torch.optim.Optimizer] | str, **reading: Any) -> None:
    """Register another Muon implementation in one call: ``register_muon(MyMuon, momentum=lambda g: g["beta"])``
    (keyword arguments of :func:`muon_rule`; the class, or its ``"package.module.Class"`` path)."""
    name = optimizer_class if isinstance(optimizer_class, str) else optimizer_class.__name__
    register_optimizer(optimizer_class, muon_rule(name.rsplit(".", 1)[-1], **reading))


if (_muon := api("muon")) is not None:  # torch >= 2.9
    register_muon(_muon)
