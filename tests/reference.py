"""An independent reference for the per-group metrics: explicit vectors and projections in float64.

Written from docs/theory.md directly, without the package's inner-product formulas: every quantity is a
real vector here (u_k, Δ⊥, g⊥, c), and angles come from the chord between u_k and u_{k+1}.
"""

from __future__ import annotations

import statistics

import torch
from torch import Tensor


def cos(p: Tensor, q: Tensor) -> Tensor:
    return (p * q).sum(1) / (p.norm(dim=1) * q.norm(dim=1))


def perp(q: Tensor, u: Tensor) -> Tensor:
    """Tangential part of each row of ``q`` relative to the unit rows ``u``."""
    return q - (q * u).sum(1, keepdim=True) * u


def group_metrics(
    x0: Tensor,
    x1: Tensor,
    g: Tensor,
    lr: float | Tensor,
    a: Tensor | None = None,
    b: Tensor | None = None,
    measured: bool = False,
    decay: float = 0.0,
    length: Tensor | float | None = None,
) -> dict[str, Tensor]:
    """Per-group metrics of one step from rows ``(G, d)`` of x_k, x_{k+1}, g_k (and Adam's a, b).

    ``lr`` may be a tensor of shape ``(d,)`` (per-entry learning rates). ``measured`` selects the
    measured effective learning rate sin θ / ‖∇L(u_k)‖ instead of the §3 formula. ``length``: the update length
    the optimizer's hyper-parameters predict per group (§8), with ``decay`` its decoupled decay ηλ.
    """
    x0, x1, g = x0.double(), x1.double(), g.double()
    lr = torch.as_tensor(lr, dtype=torch.float64)
    r0, r1 = x0.norm(dim=1), x1.norm(dim=1)
    u = x0 / r0[:, None]
    delta = x1 - x0
    delta_perp = perp(delta, u)
    theta = 2 * torch.asin((x1 / r1[:, None] - u).norm(dim=1) / 2)  # from the chord: exact for small angles
    g_perp = perp(g, u)
    riemannian = r0[:, None] * g_perp  # ∇L(u_k)
    out = {
        "norm": r1,
        "angular_update": theta,
        "radial_update": (delta * u).sum(1) / r0,
        "tangential_update": delta_perp.norm(dim=1) / r0,
        "grad_cos": cos(g, x0),
        "sphere_grad_norm": riemannian.norm(dim=1),
        "direction_cos": cos(-delta_perp, riemannian),
    }
    if measured:
        out["effective_lr"] = theta.sin() / riemannian.norm(dim=1)
    else:
        preconditioner = (torch.ones_like(x0) if b is None else b.double()) / lr  # P = b ⊘ η
        rms = preconditioner.norm(dim=1) / x0.shape[1] ** 0.5
        out["effective_lr"] = 1 / (r0 * r1 * rms)
    if length is not None:
        out["update_scale"] = (delta + decay * x0).norm(dim=1) / torch.as_tensor(length, dtype=torch.float64)
    if a is not None:
        a, b = a.double(), b.double()
        out["deformation_cos"] = cos(perp(a / b, u), perp(a, u))
        out["momentum_radial"] = (a * u).sum(1) / a.norm(dim=1)
    return out


#: How each metric is summarized per layer, restated from the specification (not imported from the package,
#: so that a change there shows up here).
REDUCE = {
    "update_scale": "rms",
    "norm": "rms",
    "angular_update": "rms",
    "radial_update": "mean",
    "tangential_update": "rms",
    "effective_lr": "median",
    "grad_cos": "maxabs",
    "sphere_grad_norm": "rms",
    "direction_cos": "mean",
    "deformation_cos": "mean",
    "momentum_radial": "mean",
}


def summarize(values: Tensor, how: str) -> float:
    """Reduce a layer's per-group values the way each metric is summarized (plain Python statistics)."""
    v = [float(x) for x in values if torch.isfinite(x)]
    if how == "mean":
        return statistics.fmean(v)
    if how == "rms":
        return statistics.fmean(x * x for x in v) ** 0.5
    if how == "median":
        return statistics.median(v)
    return max(abs(x) for x in v)


def rows(weight: Tensor) -> Tensor:
    """A float64 copy on the CPU of a Conv/Linear weight, one row per output channel."""
    return weight.detach().reshape(weight.shape[0], -1).to("cpu", torch.float64, copy=True)
