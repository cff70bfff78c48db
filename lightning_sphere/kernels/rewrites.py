"""The spherical correction's per-row kernels: what a rewrite reads of the step just taken, and what it writes.

Same conventions as :mod:`lightning_sphere.kernels.products`; ``decay_factor`` is the 1 − ηλ of a decoupled (or
SGD's) weight decay. Every kernel undoes the step from the optimizer's own quantities (x_k = (x_{k+1} + η
step)/(1 − ηλ)) instead of keeping a copy of the weights (docs/theory.md §4.3, §6).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lightning_sphere.kernels.products import _columns, _dot, adam_denominator


class RewriteSums(NamedTuple):
    """Per-row sums of :func:`adam_sums` and :func:`momentum_sums`, before anything is written: ‖x_k‖²,
    ⟨x_k, g⟩, ‖g‖² (the invariance test), then, for the step as it will be rewritten, ‖x_{k+1}‖²,
    ⟨x_k, x_{k+1}⟩ and ⟨m, x_{k+1}⟩ (m the momentum); last ``undo`` = (‖x_{k+1}‖² + ‖step‖²)/(1 − ηλ)², the
    scale of the round-off in x_k = (x_{k+1} + step)/(1 − ηλ) (a zero x_k comes back as noise of that size)."""

    xx: Tensor
    xg: Tensor
    gg: Tensor
    x1x1: Tensor
    xx1: Tensor
    mx1: Tensor
    undo: Tensor


class AdamGSums(NamedTuple):
    """Per-row sums of :func:`adamg_sums`: ‖u_k‖², ⟨u_k, g⟩, ‖g‖², ‖x_{k+1}‖², and ``undo`` as in
    :class:`RewriteSums`."""

    xx: Tensor
    xg: Tensor
    gg: Tensor
    x1x1: Tensor
    undo: Tensor


def _invariance(x: Tensor, g: Tensor) -> dict[str, Tensor]:
    """‖x‖², ⟨x, g⟩, ‖g‖²: what the invariance test |cos(g, x)| of a group needs."""
    return {"xx": _dot(x, x), "xg": _dot(x, g), "gg": _dot(g, g)}


def _undo(x1: Tensor, step: Tensor, decay_factor: Tensor) -> Tensor:
    """(‖x_{k+1}‖² + ‖step‖²)/(1 − ηλ)²: the scale of x_k = (x_{k+1} + step)/(1 − ηλ), before cancellation."""
    return (_dot(x1, x1) + _dot(step, step)) / decay_factor.square()


def adam_sums(
    x1: Tensor, m: Tensor, v: Tensor, g: Tensor, b: Tensor | None, lr: Tensor, inv_bias1: Tensor,
    inv_sqrt_bias2: Tensor, eps: Tensor, decay_factor: Tensor,
) -> Tensor:  # fmt: skip
    """The :class:`RewriteSums` of the Adam step torch took, as S rewrites it when ``b`` (AdamS's per-row
    denominator) is given; reads only: ``(C, 7)``."""
    taken = lr * m * inv_bias1 / adam_denominator(v, inv_sqrt_bias2, eps)
    x0 = (x1 + taken) / decay_factor  # undo the step (and AdamW's decoupled decay): x_k
    undo = _undo(x1, taken, decay_factor)
    if b is not None:
        x1 = x1 + taken - lr * m * inv_bias1 / b
    sums = {"x1x1": _dot(x1, x1), "xx1": _dot(x0, x1), "mx1": _dot(m, x1)}
    return _columns(RewriteSums, **_invariance(x0, g), **sums, undo=undo)


def adam_apply(
    x1: Tensor, m: Tensor, v: Tensor, b: Tensor | None, lr: Tensor, inv_bias1: Tensor, inv_sqrt_bias2: Tensor,
    eps: Tensor, decay_factor: Tensor, mask: Tensor, rewritten: bool, keep: Tensor | None, along: Tensor | None,
    ratio: Tensor | None,
) -> None:  # fmt: skip
    """Write the rewritten step in place, in the rows of ``mask`` only (the others keep torch's bits): S into
    ``x1`` when ``b`` is given and ``x1`` is not ``rewritten`` yet, then, when ``keep`` is given, R and T:
    m ← keep·m − along·x_k and v ← ratio·v."""
    step = lr * m * inv_bias1 / (adam_denominator(v, inv_sqrt_bias2, eps) if b is None else b)
    if b is not None and not rewritten:
        taken = lr * m * inv_bias1 / adam_denominator(v, inv_sqrt_bias2, eps)
        x0 = (x1 + taken) / decay_factor
        x1.copy_(torch.where(mask, x1 + taken - step, x1))
    else:
        x0 = (x1 + step) / decay_factor
    if keep is not None and along is not None:
        m.copy_(torch.where(mask, keep * m - along * x0, m))
        if ratio is not None:
            v.copy_(torch.where(mask, ratio * v, v))


def momentum_sums(x1: Tensor, buf: Tensor, g: Tensor, lr: Tensor) -> Tensor:
    """The :class:`RewriteSums` of an SGD-M step, with x_k = x_{k+1} + η buf: ``(C, 7)``."""
    step = lr * buf
    x0 = x1 + step
    sums = {"x1x1": _dot(x1, x1), "xx1": _dot(x0, x1), "mx1": _dot(buf, x1), "undo": _undo(x1, step, lr.new_ones(()))}
    return _columns(RewriteSums, **_invariance(x0, g), **sums)


def momentum_transport(x1: Tensor, buf: Tensor, lr: Tensor, keep: Tensor, along: Tensor, mask: Tensor) -> None:
    """R and T of SGD's momentum buffer in place, in the rows of ``mask``: buf ← keep·buf − along·x_k."""
    x0 = x1 + lr * buf
    buf.copy_(torch.where(mask, keep * buf - along * x0, buf))


def adamg_sums(x1: Tensor, g: Tensor, lr: Tensor, decay_factor: Tensor) -> Tensor:
    """The :class:`AdamGSums` per row, with u_k = (x_{k+1} + η g)/(1 − ηλ): ``(C, 5)``."""
    step = lr * g
    u0 = (x1 + step) / decay_factor
    undo = _undo(x1, step, decay_factor)
    return _columns(AdamGSums, **_invariance(u0, g), x1x1=_dot(x1, x1), undo=undo)


def adamg_direction(
    x1: Tensor, g: Tensor, lr: Tensor, decay_factor: Tensor, inv_r0_sq: Tensor, fresh: Tensor,
    norm: Tensor | None, mask: Tensor | None, back: Tensor | None, r0: Tensor | None,
) -> Tensor:  # fmt: skip
    """y = (1−ηλ) u_k − η g/r̂_k² (§4), or x_{k+1} itself in the ``fresh`` rows (radius not known yet).

    y is plain SGD's step from the real weights r̂_k u_k, divided by r̂_k: its gradient there is g/r̂_k by
    invariance. For a tangent g this is AdamG's (1−ηλ) u_k + Δ'⊥/r̂_k²; taking all of g keeps it plain SGD's
    when the gradient the step used has a radial part too (a gradient clipped entry by entry).

    With ``norm`` (‖y‖ per row), write y/‖y‖ into ``x1`` in the rows of ``mask``, and plain SGD's step from
    the real weights, r̂_k (x_{k+1} + η g) − η g/r̂_k, in the rows given ``back`` (``r0`` = r̂_k); return an
    empty tensor. Without, return ‖y‖² per row: ``(C, 1)``.
    """
    step = lr * g
    u0 = (x1 + step) / decay_factor
    y = torch.where(fresh, x1, decay_factor * u0 - step * inv_r0_sq)
    if norm is not None and mask is not None and back is not None and r0 is not None:
        real = r0 * (x1 + step) - step / r0
        x1.copy_(torch.where(mask, y / norm, torch.where(back, real, x1)))
        return x1.new_empty(0)
    return _dot(y, y)[:, None]


def scale_rows(g: Tensor, factor: Tensor) -> None:
    """g ← factor·g in place, ``factor`` a ``(C, 1)`` column (the AdamG rewrite's conversions between the
    gradients of the stored and of the real weights)."""
    g.mul_(factor)


class UpdateSums(NamedTuple):
    """Per-row sums of :func:`update_sums`, for the corrections that steer any optimizer's update (rotational,
    hyperball: docs/theory.md §9) from a copy of x_k: ‖x_k‖², ⟨x_k, g⟩, ‖g‖² (the invariance test), ‖x_{k+1}‖²
    of the plain step, ``undo`` = ‖x_k‖² (x_k is copied, not undone: no round-off to allow for), then of the
    update Δ = (1 − ηλ) x_k − x_{k+1} (the plain step less its decoupled decay, η times the base update):
    ⟨x_k, Δ⟩, ‖Δ‖², ΣΔ and Σx_k (the last two for centering)."""

    xx: Tensor
    xg: Tensor
    gg: Tensor
    x1x1: Tensor
    undo: Tensor
    xd: Tensor
    dd: Tensor
    sd: Tensor
    sx: Tensor


def update_sums(
    x0: Tensor, x1: Tensor, g: Tensor, decay_factor: Tensor, held: Tensor, a: Tensor, b: Tensor
) -> Tensor:  # fmt: skip
    """The :class:`UpdateSums` per row of the step from ``x0`` (x_k, copied) to ``x1`` (x_{k+1}): ``(C, 9)``. The
    update is Δ = (1 − ηλ) x_k − x_{k+1} − (a x_k + b·held): ``a``, ``b`` take a decay coupled into the gradient
    out of it, ``held`` its momentum (torch's SGD, §9.1); zero otherwise."""
    d = decay_factor * x0 - x1 - (a * x0 + b * held)
    xx = _dot(x0, x0)
    return _columns(
        UpdateSums, **_invariance(x0, g), x1x1=_dot(x1, x1), undo=xx, xd=_dot(x0, d), dd=_dot(d, d),
        sd=d.sum(1), sx=x0.sum(1),
    )  # fmt: skip


def rotational_write(
    x0: Tensor, x1: Tensor, decay_factor: Tensor, held: Tensor, a: Tensor, b: Tensor, inv_lr: Tensor, mean_x: Tensor,
    kx: Tensor, mean_u: Tensor, along: Tensor, step: Tensor, scale: Tensor, mask: Tensor,
) -> None:  # fmt: skip
    """Kosson et al.'s rotational step in the rows of ``mask`` (docs/theory.md §9.1), the others keeping torch's:
    x' = (x_k − mean_x)·kx (centered once, at the group's first step), u = ((1 − ηλ) x_k − x_{k+1})/η the base
    update (less a coupled decay, as in :func:`update_sums`), u_c = u − mean_u, u_⊥ = u_c − along·x',
    x_{k+1} ← scale·(x' − step·u_⊥). Columns ``(C, 1)`` per row."""
    x = (x0 - mean_x) * kx
    u = (decay_factor * x0 - x1 - (a * x0 + b * held)) * inv_lr - mean_u
    x1.copy_(torch.where(mask, scale * (x - step * (u - along * x)), x1))


def hyperball_write(x0: Tensor, x1: Tensor, decay_factor: Tensor, step: Tensor, scale: Tensor, mask: Tensor) -> None:
    """The hyperball step in the rows of ``mask`` (docs/theory.md §9.2), the others keeping torch's: with Δ = (1 − ηλ)
    x_k − x_{k+1} (the update, decay excluded), x_{k+1} ← scale·(x_k − step·Δ); ``step`` = ηR/‖Δ‖ and ``scale`` =
    R/‖x_k − step·Δ‖ per group, as ``(C, 1)`` columns."""
    x1.copy_(torch.where(mask, scale * (x0 - step * (decay_factor * x0 - x1)), x1))
