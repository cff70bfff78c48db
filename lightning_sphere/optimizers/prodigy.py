"""Prodigy in the registry (Mishchenko & Defazio, arXiv 2306.06101; the ``prodigyopt`` package), docs/theory.md §8.6.

Prodigy is Adam whose step size it learns: each step it uses dlr = d · η · √(1 − β2^{k+1})/(1 − β1^{k+1}) (the bias
correction when ``use_bias_correction``), accumulates m and v with d (m = Σ d (1 − β1)β1^j g, v likewise with d²),
then moves d and steps x ← (1 − dlr λ) x − dlr m ⊘ (√v + d' ε), d' the moved d. That is the §2 scheme with a = m,
b = √v + d'ε and the learning rate in force dlr, read from the param group as it was before the step (d moves
inside it): the closed-form effective learning rate, the Adam diagnostics and, with its decoupled decay, the
AdamW equilibrium √(2 dlr λ (1 − β1)/(1 + β1)) then use the step size Prodigy actually took.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from lightning_sphere.correction.base import Moments
from lightning_sphere.kernels.compiled import host_float
from lightning_sphere.optimizers.equilibrium import angular_update_equilibrium
from lightning_sphere.optimizers.registry import MEASURED, OptimizerRule, ParamGroup, register_optimizer


def _lr_in_force(before: ParamGroup, after: ParamGroup) -> float:
    """dlr = d · η · (bias correction at the step's k), from the group as it was before the step."""
    beta1, beta2 = before["betas"]
    k = before["k"]
    correction = (1 - beta2 ** (k + 1)) ** 0.5 / (1 - beta1 ** (k + 1)) if before["use_bias_correction"] else 1.0
    return before["d"] * before["lr"] * correction


def _moments(state: dict[str, Any], group: ParamGroup) -> Moments | None:
    """a = m, b = √v + d ε with d as the step left it (no bias correction: it is in dlr)."""
    if "exp_avg" not in state:
        return None
    return Moments(state["exp_avg"], state["exp_avg_sq"], 1.0, 1.0, eps=group["d"] * group["eps"])


def _equilibrium(group: ParamGroup) -> float | None:
    lr, beta1 = host_float(group["lr"]), host_float(group["betas"][0])
    if not group.get("decouple", True) or lr is None or beta1 is None:
        return None
    return angular_update_equilibrium("adamw", lr, group["weight_decay"], beta1)


def _without_momentum(optimizer: torch.optim.Optimizer) -> OptimizerRule:
    """With β1 = 0 Prodigy keeps no m and steps d·dlr·g ⊘ (√v + dε): measured, not read from the scheme."""
    return replace(MEASURED, name="Prodigy") if optimizer.defaults["betas"][0] == 0 else PRODIGY


PRODIGY = OptimizerRule(
    "Prodigy",
    moments=_moments,
    decoupled_decay=lambda group: group.get("decouple", True),
    equilibrium=_equilibrium,
    lr_in_force=_lr_in_force,
)
register_optimizer("prodigyopt.prodigy.Prodigy", replace(PRODIGY, specialize=_without_momentum))
