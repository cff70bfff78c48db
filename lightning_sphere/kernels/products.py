"""The measurement's per-row kernels: every inner product of one step, per output channel, in one pass.

Each is a plain torch function of 2-D row views ``(C, n)``, one row per output channel
(:meth:`~lightning_sphere.core.groups.ParamSlice.rows`), returning per-row sums ``(C, 12)`` whose columns are
named by :class:`StepProducts`; combining rows into groups happens on those small results
(:class:`~lightning_sphere.core.rows.RowIndex`). Notation (docs/theory.md §1–§2): ``x = x_k``,
``x1 = x_{k+1}``, ``Δ = x1 − x``, ``g`` the gradient, ``a`` the momentum, ``b`` the denominator,
``s = η a ⊘ b`` the step direction, ``P = b/η`` its preconditioner.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


def _columns(kind: type[NamedTuple], **columns: Tensor) -> Tensor:
    """Per-row sums ``(C, k)`` in the column order ``kind`` names."""
    return torch.stack([columns[name] for name in kind._fields], 1)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(1)


def _step(x: Tensor, x1: Tensor, g: Tensor, s0: Tensor, s1: Tensor) -> dict[str, Tensor]:
    """⟨x,x⟩ ⟨x,Δ⟩ ⟨Δ,Δ⟩ ⟨x,g⟩ ⟨g,g⟩ ⟨Δ,g⟩ for x̃ = s0·x_k, x̃' = s1·x_{k+1} and g̃ = g/s0 (by invariance)."""
    x, x1, g = x * s0, x1 * s1, g / s0
    d = x1 - x
    return {"xx": _dot(x, x), "xd": _dot(x, d), "dd": _dot(d, d), "xg": _dot(x, g), "gg": _dot(g, g), "dg": _dot(d, g)}


def sgd_products(x: Tensor, x1: Tensor, g: Tensor, s0: Tensor, s1: Tensor) -> Tensor:
    """The :class:`StepProducts` of a non-adaptive step (b ≡ 1) at η = 1: ``(C, 12)``.

    ``pp`` is d, the ‖P‖² of a unit learning rate: the caller divides it by η² (P = 1/η on every entry),
    which keeps η, a host float, out of the compiled graph. ``s0``, ``s1`` scale the stored weights
    before and after the step to the virtual ones of the AdamG rewrite (1 otherwise). The adaptive
    columns are zero.
    """
    step = _step(x, x1, g, s0, s1)
    zero = torch.zeros_like(step["xx"])
    pp = torch.full_like(zero, x.shape[1])
    return _columns(StepProducts, **step, pp=pp, xa=zero, aa=zero, xs=zero, ss=zero, sa=zero)


def adam_products(
    x: Tensor, x1: Tensor, g: Tensor, s0: Tensor, s1: Tensor, lr: Tensor, m: Tensor, v: Tensor, b: Tensor | None,
    inv_bias1: Tensor, inv_sqrt_bias2: Tensor, eps: Tensor,
) -> Tensor:  # fmt: skip
    """The :class:`StepProducts` of an Adam step, with a = m̂ and b = √v̂ + ε (§2): ``(C, 12)``.

    ``b`` is computed from ``v`` element-wise, or given one per row (AdamS's group denominator; NaN in the
    rows whose step was left to Adam's element-wise one).
    """
    a = m * inv_bias1
    elementwise = adam_denominator(v, inv_sqrt_bias2, eps)
    b = elementwise if b is None else torch.where(b.isnan(), elementwise, b)
    lr = lr.to(a)
    s, p = lr * a / b, b / lr
    xs0 = x * s0
    adaptive = {"pp": _dot(p, p), "xa": _dot(xs0, a), "aa": _dot(a, a), "xs": _dot(xs0, s), "ss": _dot(s, s)}
    return _columns(StepProducts, **_step(x, x1, g, s0, s1), **adaptive, sa=_dot(s, a))


def adam_denominator(v: Tensor, inv_sqrt_bias2: Tensor, eps: Tensor) -> Tensor:
    """b = √v̂ + ε, as torch's Adam computes it."""
    return v.sqrt() * inv_sqrt_bias2 + eps


class StepProducts(NamedTuple):
    """The inner products of one step, per row or per group (each field a tensor of shape ``(M,)``).

    The measurement kernels return them as the columns of one ``(C, 12)`` tensor, in this order.
    ``pp = ‖P‖²`` holds for every scheme of §2 (``d/η²`` for SGD, b ≡ 1); the ``xa … sa`` fields are
    defined for the adaptive schemes (Adam, AdamW) only, with ``a`` the bias-corrected momentum and
    ``s = η a ⊘ b``.
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
