"""Prodigy in the registry (Mishchenko & Defazio, arXiv 2306.06101; the ``prodigyopt`` package), docs/theory.md §8.6.

Prodigy is Adam whose step size it learns. Each step it accumulates m and v with its estimate d (m ← β1 m + d(1 − β1)g,
v ← β2 v + d²(1 − β2)g²), moves d to d', and steps x ← (1 − dlr λ) x − dlr m ⊘ (√v + d'ε), dlr = d η c₂/c₁ with
c₁ = 1 − β1^t, c₂ = √(1 − β2^t) under ``use_bias_correction`` (else 1), t the step's count. That is Adam's step
with the learning rate d η:

  dlr m ⊘ (√v + d'ε) = d η · a ⊘ b,  a = m/(d' c₁), b = √v/(d' c₂) + ε/c₂,

a and b in the gradient's units as Adam's m̂ and √v̂ + ε. The learning rate in force is d η, from the param group
as it was before the step (d moves inside it); the closed-form effective learning rate, the Adam diagnostics and,
with the decoupled decay dlr λ per step, the AdamW equilibrium then describe the step Prodigy took. With β1 = 0
it keeps no m: the effective learning rate is the measured one, the equilibrium AdamW's at β1 = 0.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from lightning_sphere.correction.base import Moments
from lightning_sphere.kernels.compiled import host_float
from lightning_sphere.optimizers.equilibrium import angular_update_equilibrium
from lightning_sphere.optimizers.registry import OptimizerRule, ParamGroup, register_optimizer


def _lr_in_force(before: ParamGroup, after: ParamGroup) -> float:
    """d η, with d as it was before the step."""
    return before["d"] * before["lr"]


def _corrections(group: ParamGroup) -> tuple[float, float]:
    """c₁ = 1 − β1^t and c₂ = √(1 − β2^t) of the step just taken (``k`` is t after it), 1 without bias correction."""
    if not group["use_bias_correction"]:
        return 1.0, 1.0
    beta1, beta2 = group["betas"]
    return 1 - beta1 ** group["k"], (1 - beta2 ** group["k"]) ** 0.5


def _moments(state: dict[str, Any], group: ParamGroup) -> Moments | None:
    """a = m/(d' c₁), b = √v/(d' c₂) + ε/c₂, d' the d the step left."""
    if "exp_avg" not in state:
        return None
    c1, c2 = _corrections(group)
    d = group["d"]
    return Moments(state["exp_avg"], state["exp_avg_sq"], 1 / (d * c1), 1 / (d * c2), eps=group["eps"] / c2)


def _weight_decay(group: ParamGroup) -> float:
    """The decay per unit of the learning rate in force: the step decays by dlr λ = d η (c₂/c₁) λ."""
    c1, c2 = _corrections(group)
    return group["weight_decay"] * c2 / c1


def _equilibrium(group: ParamGroup) -> float | None:
    lr, beta1 = host_float(group["lr"]), host_float(group["betas"][0])
    if not group.get("decouple", True) or lr is None or beta1 is None:
        return None
    return angular_update_equilibrium("adamw", lr, _weight_decay(group), beta1)


def _without_momentum(optimizer: torch.optim.Optimizer) -> OptimizerRule:
    """With β1 = 0 Prodigy keeps no m and steps d dlr · g ⊘ (√v + d'ε): the effective learning rate is measured,
    the equilibrium AdamW's at β1 = 0."""
    return MOMENTUMLESS if optimizer.defaults["betas"][0] == 0 else PRODIGY


PRODIGY = OptimizerRule(
    "Prodigy",
    moments=_moments,
    decoupled_decay=lambda group: group.get("decouple", True),
    equilibrium=_equilibrium,
    lr_in_force=_lr_in_force,
    weight_decay=_weight_decay,
)
MOMENTUMLESS = replace(PRODIGY, moments=None, formula=False)
register_optimizer("prodigyopt.prodigy.Prodigy", replace(PRODIGY, specialize=_without_momentum))
