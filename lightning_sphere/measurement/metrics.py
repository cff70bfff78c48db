"""The image of one optimizer step on the unit sphere, per radially invariant group: the metric registry.

Pure functions of per-group inner products: no Lightning, no logging, no state. Notation follows
docs/theory.md §1–§3: ``x = x_k``, ``Δ = x_{k+1} − x_k`` (the update actually applied), ``g = g_k`` (the
gradient that update used), ``u = x/‖x‖``, ``q⊥ = q − ⟨q, u⟩u``. For the schemes of §2,
``x_{k+1} = x_k − a ⊘ P`` (plus decoupled decay for AdamW) with ``P = b ⊘ η`` the preconditioner of a
unit step, ``a`` the momentum and ``s = a ⊘ P = η a ⊘ b`` the step direction.

Each metric is one :class:`Metric` of :data:`METRICS`: its formula (a function of the group's
:class:`GroupStats` and of the quantities every formula shares, :class:`Sphere`), how it is summarized
per layer, its unit, its theory section and whether it is histogrammed. Working from inner products
keeps every group's metrics a handful of element-wise operations on ``M``-vectors, whatever the groups'
dimensions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


class GroupStats(NamedTuple):
    """Everything :func:`sphere_metrics` needs of one step, one entry per group (tensors of shape ``(M,)``): the
    :class:`~lightning_sphere.kernels.products.StepProducts` fields, then the group's size d, 0/1 flags for whether
    the closed-form effective learning rate applies (``formula``) and whether ``a``, ``b`` come from Adam's state
    (``adaptive``), the §7 equilibrium for the group's hyper-parameters (NaN where none applies), the product ηλ of
    a decoupled weight decay applied in the step (0 for none), and the length of the step's update (the step less
    that decay) its hyper-parameters predict, ``update_length + relative_length · r_k`` (§8; NaN where they
    predict none)."""

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
    group_size: Tensor
    formula: Tensor
    adaptive: Tensor
    equilibrium: Tensor
    decay: Tensor
    update_length: Tensor
    relative_length: Tensor


class Sphere(NamedTuple):
    """Per-group quantities several metrics share, derived once from :class:`GroupStats`."""

    r0: Tensor  # r_k = ‖x_k‖
    r1: Tensor  # r_{k+1} = ‖x_k + Δ‖
    tangential: Tensor  # ‖Δ⊥‖
    grad_tangential: Tensor  # ‖g⊥‖
    sphere_grad: Tensor  # ‖∇L(u_k)‖ = r_k ‖g⊥‖ (§1)


def _tangential_norm(qq: Tensor, xq: Tensor, xx: Tensor) -> Tensor:
    """‖q⊥‖ from ‖q‖², ⟨x, q⟩ and ‖x‖² (§1: q⊥ = q − ⟨q, u⟩u)."""
    return (qq - xq.square() / xx).clamp(min=0).sqrt()


def sphere_of(st: GroupStats) -> Sphere:
    r0 = st.xx.sqrt()
    grad_tangential = _tangential_norm(st.gg, st.xg, st.xx)
    return Sphere(
        r0=r0,
        r1=(st.xx + 2 * st.xd + st.dd).clamp(min=0).sqrt(),
        tangential=_tangential_norm(st.dd, st.xd, st.xx),
        grad_tangential=grad_tangential,
        sphere_grad=r0 * grad_tangential,
    )


def _angular_update(st: GroupStats, sp: Sphere) -> Tensor:
    return torch.atan2(sp.tangential, sp.r0 + st.xd / sp.r0)  # exact for any optimizer, and at small angles


def _effective_lr(st: GroupStats, sp: Sphere) -> Tensor:
    # η^e = η/(r_k r_{k+1} rms(b)) = 1/(r_k r_{k+1} rms(P)); outside §2 the measured sin θ/‖∇L(u_k)‖.
    formula = 1 / (sp.r0 * sp.r1 * (st.pp / st.group_size).sqrt())
    measured = sp.tangential / sp.r1 / sp.sphere_grad
    return torch.where(st.formula.bool(), formula, measured)


def _direction_cos(st: GroupStats, sp: Sphere) -> Tensor:
    # ⟨−Δ⊥, g⊥⟩ = −(⟨Δ, g⟩ − ⟨Δ, u⟩⟨g, u⟩)
    return -(st.dg - st.xd * st.xg / st.xx) / (sp.tangential * sp.grad_tangential)


def _adaptive_only(value: Tensor, st: GroupStats) -> Tensor:
    return torch.where(st.adaptive.bool(), value, torch.full_like(value, float("nan")))


def _deformation_cos(st: GroupStats, sp: Sphere) -> Tensor:
    s_a_tangential = st.sa - st.xs * st.xa / st.xx  # ⟨s⊥, a⊥⟩
    norms = _tangential_norm(st.ss, st.xs, st.xx) * _tangential_norm(st.aa, st.xa, st.xx)
    return _adaptive_only(s_a_tangential / norms, st)


def _update_scale(st: GroupStats, sp: Sphere) -> Tensor:
    # ‖Δ + ηλ x_k‖² = ‖Δ‖² + 2ηλ⟨x_k, Δ⟩ + (ηλ)²‖x_k‖²: the update less its decoupled decay, over the length predicted
    update = (st.dd + 2 * st.decay * st.xd + st.decay.square() * st.xx).clamp(min=0).sqrt()
    return update / (st.update_length + st.relative_length * sp.r0)


def _momentum_radial(st: GroupStats, sp: Sphere) -> Tensor:
    return _adaptive_only(st.xa / (sp.r0 * st.aa.sqrt()), st)


@dataclass(frozen=True)
class Metric:
    """One per-group metric of a step.

    Attributes:
        name: the key's middle part, ``sphere/<name>/<module name>``.
        formula: the per-group values ``(M,)`` from the step's :class:`GroupStats` and :class:`Sphere`;
            NaN where undefined.
        reduction: how a layer's groups (and all groups) are summarized: ``"rms"``, ``"mean"``,
            ``"median"`` or ``"maxabs"`` (:func:`~lightning_sphere.measurement.reduce.segment_reduce`).
        unit: the unit of the values.
        section: the section of docs/theory.md that defines it.
        doc: one line saying what it is.
        histogram: whether its per-group distribution is logged as a histogram.
        needs_gradient: whether it describes the step's gradient (or the moments that gradient made): NaN, and
            so not logged, for a group that had no gradient on the step (the optimizer did not step it, or it
            dropped the gradient before it could be read), rather than a value computed from a zero.
    """

    name: str
    formula: Callable[[GroupStats, Sphere], Tensor]
    reduction: str
    unit: str
    section: str
    doc: str
    histogram: bool = False
    needs_gradient: bool = False


#: The per-group metrics, name → :class:`Metric`, in the order they are computed, logged and charted.
METRICS: dict[str, Metric] = {
    metric.name: metric
    for metric in [
        Metric("norm", lambda st, sp: sp.r1, "rms", "as the weights", "§1", "r_{k+1}, the norm after the step", True),
        Metric("angular_update", _angular_update, "rms", "rad", "§3", "θ_k, the angle from x_k to x_{k+1}", True),
        Metric("radial_update", lambda st, sp: st.xd / st.xx, "mean", "fraction of r_k", "§3", "⟨Δ, u_k⟩ / r_k"),
        Metric("tangential_update", lambda st, sp: sp.tangential / sp.r0, "rms", "fraction of r_k", "§3", "‖Δ⊥‖ / r_k"),
        Metric(
            "effective_lr",
            _effective_lr,
            "median",
            "rad per unit of ‖∇L(u_k)‖",
            "§3",
            "η_k / (r_k r_{k+1} rms(b_k)), else the measured sin θ_k / ‖∇L(u_k)‖",
            True,
            needs_gradient=True,
        ),
        Metric(
            "grad_cos",
            lambda st, sp: st.xg / (sp.r0 * st.gg.sqrt()),
            "maxabs",
            "cosine",
            "§1",
            "⟨g_k, u_k⟩ / ‖g_k‖",
            needs_gradient=True,
        ),
        Metric(
            "sphere_grad_norm",
            lambda st, sp: sp.sphere_grad,
            "rms",
            "loss per rad",
            "§1",
            "‖∇L(u_k)‖ = r_k ‖g_k⊥‖, the Riemannian gradient",
            needs_gradient=True,
        ),
        Metric("direction_cos", _direction_cos, "mean", "cosine", "§3", "cos(−Δ⊥, ∇L(u_k))", needs_gradient=True),
        Metric(
            "deformation_cos",
            _deformation_cos,
            "mean",
            "cosine",
            "§5",
            "Adam: cos((a⊘b)⊥, a⊥)",
            needs_gradient=True,
        ),
        Metric(
            "momentum_radial", _momentum_radial, "mean", "cosine", "§5", "Adam: ⟨a, u_k⟩ / ‖a‖", needs_gradient=True
        ),
        Metric(
            "update_scale",
            _update_scale,
            "rms",
            "ratio",
            "§8",
            "‖Δ + ηλ x_k‖ over the update length the hyper-parameters predict (Muon, Lion, Adafactor)",
        ),
        Metric(
            "angular_update_equilibrium",
            lambda st, sp: st.equilibrium,
            "rms",
            "rad",
            "§7",
            "the angular update §7 predicts at equilibrium; under the rotational or hyperball mode, the one it "
            "imposes (§9)",
        ),
    ]
}


#: The metrics whose per-group distribution is logged as a histogram.
HISTOGRAMS = tuple(name for name, metric in METRICS.items() if metric.histogram)


#: The count logged under ``sphere/skipped_groups/all``: groups left out of a step (zero norm, non-finite).
SKIPPED_GROUPS = "skipped_groups"


def sphere_metrics(st: GroupStats) -> dict[str, Tensor]:
    """Every per-group metric of one step (docs/theory.md §3, §5, §7), NaN where it is undefined.

    A group whose ``x_k`` or ``x_{k+1}`` is zero or whose products are not finite gets NaN in every
    metric; see :func:`valid_groups`. Where a denominator vanishes (a zero gradient, an update with no
    tangential part) only the metrics that divide by it are NaN. A group that had no gradient on the step
    (``gg`` NaN: there was none to read) is NaN in the metrics that need one (:attr:`Metric.needs_gradient`).

    Returns:
        metric name → per-group values ``(M,)``, in the order of :data:`METRICS`.
    """
    sphere = sphere_of(st)
    valid = valid_groups(st)
    with_gradient = valid & ~st.gg.isnan()
    nan = torch.full_like(sphere.r0, float("nan"))
    return {
        name: torch.where(with_gradient if metric.needs_gradient else valid, metric.formula(st, sphere), nan)
        for name, metric in METRICS.items()
    }


def valid_groups(st: GroupStats) -> Tensor:
    """Groups whose step can be seen on the sphere: finite products, ``x_k ≠ 0`` and ``x_{k+1} ≠ 0``."""
    finite = st.xx.isfinite() & st.xd.isfinite() & st.dd.isfinite()
    return finite & (st.xx > 0) & (st.xx + 2 * st.xd + st.dd > 0)
