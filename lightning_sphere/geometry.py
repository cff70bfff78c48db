"""The image of one optimizer step on the unit sphere, per radially invariant group.

Pure functions of per-group inner products: no Lightning, no logging, no state. Notation follows
THEORY.md §1–§3: ``x = x_k``, ``Δ = x_{k+1} − x_k`` (the update actually applied), ``g = g_k`` (the
gradient that update used), ``u = x/‖x‖``, ``q⊥ = q − ⟨q, u⟩u``. For the schemes of §2,
``x_{k+1} = x_k − a ⊘ P`` (plus decoupled decay for AdamW) with ``P = b ⊘ η`` the preconditioner of a
unit step, ``a`` the momentum and ``s = a ⊘ P = η a ⊘ b`` the step direction.

Working from inner products keeps every group's metrics a handful of element-wise operations on
``M``-vectors, whatever the groups' dimensions.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class GroupStats(NamedTuple):
    """Inner products of one step, one entry per group (each field a tensor of shape ``(M,)``).

    ``pp = ‖P‖²`` holds for every scheme of §2 (``‖1⊘η‖²`` for SGD). The ``xa … sa`` fields are
    defined for the adaptive schemes (Adam, AdamW) only; ``formula``, ``adaptive`` are 0/1 flags and
    ``equilibrium`` is the §7 prediction for the group's hyper-parameters (NaN where none applies).
    """

    xx: Tensor
    xd: Tensor
    dd: Tensor
    xg: Tensor
    gg: Tensor
    dg: Tensor
    pp: Tensor
    xa: Tensor
    aa: Tensor
    xs: Tensor
    ss: Tensor
    sa: Tensor
    dim: Tensor
    formula: Tensor
    adaptive: Tensor
    equilibrium: Tensor


#: The per-group metrics :func:`sphere_metrics` returns, in a fixed order.
METRICS = (
    "norm",
    "angular_update",
    "radial_update",
    "tangential_update",
    "effective_lr",
    "grad_cos",
    "sphere_grad_norm",
    "direction_cos",
    "deformation_cos",
    "momentum_radial",
    "angular_update_equilibrium",
)


def _tangential_norm(qq: Tensor, xq: Tensor, xx: Tensor) -> Tensor:
    """‖q⊥‖ from ‖q‖², ⟨x, q⟩ and ‖x‖² (§1: q⊥ = q − ⟨q, u⟩u)."""
    return (qq - xq.square() / xx).clamp(min=0).sqrt()


def sphere_metrics(st: GroupStats) -> dict[str, Tensor]:
    """Every per-group metric of one step (THEORY.md §3, §5, §7), NaN where it is undefined.

    A group whose ``x_k`` or ``x_{k+1}`` is zero or whose products are not finite gets NaN in every
    metric; see :func:`valid_groups`. Where a denominator vanishes (a zero gradient, an update with no
    tangential part) only the metrics that divide by it are NaN.
    """
    r0 = st.xx.sqrt()  # r_k
    radial = st.xd / r0  # ⟨Δ, u_k⟩
    tangential = _tangential_norm(st.dd, st.xd, st.xx)  # ‖Δ⊥‖
    r1 = (st.xx + 2 * st.xd + st.dd).clamp(min=0).sqrt()  # r_{k+1} = ‖x_k + Δ‖
    theta = torch.atan2(tangential, r0 + radial)  # §3, exact for any optimizer
    grad_tangential = _tangential_norm(st.gg, st.xg, st.xx)
    sphere_grad = r0 * grad_tangential  # ‖∇L(u_k)‖ = r_k ‖g⊥‖ (§1)

    # §3: η^e = η/(r_k r_{k+1} rms(b)) = 1/(r_k r_{k+1} rms(P)); outside §2 the measured sin θ/‖∇L(u_k)‖.
    formula_lr = 1 / (r0 * r1 * (st.pp / st.dim).sqrt())
    measured_lr = tangential / r1 / sphere_grad
    effective_lr = torch.where(st.formula.bool(), formula_lr, measured_lr)

    # ⟨−Δ⊥, g⊥⟩ = −(⟨Δ, g⟩ − ⟨Δ, u⟩⟨g, u⟩)
    direction_cos = -(st.dg - st.xd * st.xg / st.xx) / (tangential * grad_tangential)

    # §5 diagnostics for Adam and AdamW: deformation by ⊘b, and the momentum's radial part.
    adaptive = st.adaptive.bool()
    nan = torch.full_like(r0, float("nan"))
    s_a_tangential = st.sa - st.xs * st.xa / st.xx  # ⟨s⊥, a⊥⟩
    deformation = s_a_tangential / (_tangential_norm(st.ss, st.xs, st.xx) * _tangential_norm(st.aa, st.xa, st.xx))
    momentum_radial = st.xa / (r0 * st.aa.sqrt())

    metrics = {
        "norm": r1,
        "angular_update": theta,
        "radial_update": st.xd / st.xx,
        "tangential_update": tangential / r0,
        "effective_lr": effective_lr,
        "grad_cos": st.xg / (r0 * st.gg.sqrt()),
        "sphere_grad_norm": sphere_grad,
        "direction_cos": direction_cos,
        "deformation_cos": torch.where(adaptive, deformation, nan),
        "momentum_radial": torch.where(adaptive, momentum_radial, nan),
        "angular_update_equilibrium": st.equilibrium,
    }
    valid = valid_groups(st)
    return {name: torch.where(valid, value, nan) for name, value in metrics.items()}


def valid_groups(st: GroupStats) -> Tensor:
    """Groups whose step can be seen on the sphere: finite products, ``x_k ≠ 0`` and ``x_{k+1} ≠ 0``."""
    finite = st.xx.isfinite() & st.xd.isfinite() & st.dd.isfinite()
    return finite & (st.xx > 0) & (st.xx + 2 * st.xd + st.dd > 0)


def angular_update_equilibrium(
    kind: str, lr: float, weight_decay: float, momentum: float = 0.0, dampening: float = 0.0
) -> float | None:
    """The angular update a group settles at once decay balances growth (THEORY.md §7).

    ``kind`` is ``"sgd"`` (``momentum`` is μ, ``0`` without momentum) or ``"adamw"`` (``momentum`` is
    β1). ``None`` where no fixed value exists: no weight decay, or ηλ ≥ 1. SGD-M's ``dampening`` τ scales
    both the gradient and the decay entering the buffer, so it acts as a learning rate η(1 − τ) — our
    derivation, not the paper's wording.
    """
    decay = lr * weight_decay
    if not 0 < decay < 1:
        return None
    if kind == "adamw":
        return (2 * decay * (1 - momentum) / (1 + momentum)) ** 0.5
    if momentum == 0:
        return math.acos(1 - decay)
    return (2 * decay * (1 - dampening) / (1 + momentum)) ** 0.5
