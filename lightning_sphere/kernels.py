"""The per-row kernels of the two hot paths: the inner products of a measured step, and the corrections.

Each is a plain torch function of 2-D row views ``(C, n)``, one row per output channel
(:meth:`~lightning_sphere.groups.ParamSlice.rows`), returning per-row sums ``(C, k)`` whose columns are
named by a NamedTuple (:class:`~lightning_sphere.geometry.StepProducts` for the measurement, the
``*Sums`` tuples below for the corrections); combining rows into groups and groups into coefficients
happens on those small results (:class:`~lightning_sphere.groups.RowIndex`). Hyper-parameters come as
0-dim float64 tensors (:func:`scalar`) and per-row coefficients as ``(C, 1)`` columns, so that one
compiled graph serves every step.

:class:`Kernels` runs them eagerly or compiled with ``torch.compile``, which fuses every product and
reduction of a row into one pass over memory with no full-size temporaries: a tenfold speed-up on a
ResNet-18 on a CPU. Compiling costs seconds once, so it pays for large models and on GPUs; if it fails
(no compiler at hand), the eager functions take over with one warning.

Notation (THEORY.md §1–§2): ``x = x_k``, ``x1 = x_{k+1}``, ``Δ = x1 − x``, ``g`` the gradient, ``a`` the
momentum, ``b`` the denominator, ``s = η a ⊘ b`` the step direction, ``P = b/η`` its preconditioner;
``decay_factor`` is the 1 − ηλ of a decoupled (or SGD's) weight decay.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor

from lightning_sphere.geometry import StepProducts

#: Total tracked entries from which compiling the kernels pays for its one-time cost.
COMPILE_FROM = 2**20

_F = TypeVar("_F", bound=Callable[..., Any])


def scalar(value: Any) -> Tensor:
    """A hyper-parameter (float, or tensor where it already lives) as a 0-dim float64 tensor: one compiled
    graph serves every value, and using it needs no host sync."""
    return torch.as_tensor(value, dtype=torch.float64)


class RewriteSums(NamedTuple):
    """Per-row sums of :func:`adam_rewrite`, after the rewritten step: ‖x_{k+1}‖², ‖x_k‖², ⟨x_k, x_{k+1}⟩,
    ⟨m, x_{k+1}⟩ (m Adam's first moment)."""

    x1x1: Tensor
    xx: Tensor
    xx1: Tensor
    mx1: Tensor


class MomentumSums(NamedTuple):
    """Per-row sums of :func:`momentum_sums`: ‖x_{k+1}‖², ⟨x_k, x_{k+1}⟩, ⟨m, x_{k+1}⟩ (m SGD's buffer)."""

    x1x1: Tensor
    xx1: Tensor
    mx1: Tensor


class AdamGSums(NamedTuple):
    """Per-row sums of :func:`adamg_sums`: ‖x_{k+1}‖², ‖u_k‖², ⟨Δ', u_k⟩ (Δ' = x_{k+1} − u_k)."""

    x1x1: Tensor
    uu: Tensor
    du: Tensor


class DirectionSums(NamedTuple):
    """Per-row sums of :func:`adamg_direction`: ‖y‖², ‖Δ'⊥‖²."""

    yy: Tensor
    tt: Tensor


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

    ``b`` is computed from ``v`` element-wise, or given one per row (AdamS's group denominator).
    """
    a = m * inv_bias1
    b = (adam_denominator(v, inv_sqrt_bias2, eps) if b is None else b).expand_as(a)
    lr = lr.to(a)
    s, p = lr * a / b, b / lr
    xs0 = x * s0
    adaptive = {"pp": _dot(p, p), "xa": _dot(xs0, a), "aa": _dot(a, a), "xs": _dot(xs0, s), "ss": _dot(s, s)}
    return _columns(StepProducts, **_step(x, x1, g, s0, s1), **adaptive, sa=_dot(s, a))


def adam_denominator(v: Tensor, inv_sqrt_bias2: Tensor, eps: Tensor) -> Tensor:
    """b = √v̂ + ε, as torch's Adam computes it."""
    return v.sqrt() * inv_sqrt_bias2 + eps


def adam_rewrite(
    x1: Tensor, m: Tensor, v: Tensor, b: Tensor | None, lr: Tensor, inv_bias1: Tensor, inv_sqrt_bias2: Tensor,
    eps: Tensor, decay_factor: Tensor,
) -> Tensor:  # fmt: skip
    """S (when ``b``, the per-row AdamS denominator, is given): replace the step torch took by AdamS's,
    in place in ``x1``. Returns the :class:`RewriteSums` per row: ``(C, 4)``."""
    taken = lr * m * inv_bias1 / adam_denominator(v, inv_sqrt_bias2, eps)
    step = taken if b is None else lr * m * inv_bias1 / b
    if b is not None:
        x1.add_(taken - step)
    x0 = (x1 + step) / decay_factor  # undo the step (and AdamW's decoupled decay): x_k
    return _columns(RewriteSums, x1x1=_dot(x1, x1), xx=_dot(x0, x0), xx1=_dot(x0, x1), mx1=_dot(m, x1))


def adam_transport(
    x1: Tensor, m: Tensor, v: Tensor, b: Tensor | None, lr: Tensor, inv_bias1: Tensor, inv_sqrt_bias2: Tensor,
    eps: Tensor, decay_factor: Tensor, keep: Tensor, along: Tensor, ratio: Tensor | None,
) -> None:  # fmt: skip
    """R and T in place: m ← keep·m − along·x_k, v ← ratio·v (when ``ratio`` is given)."""
    step = lr * m * inv_bias1 / (adam_denominator(v, inv_sqrt_bias2, eps) if b is None else b)
    x0 = (x1 + step) / decay_factor
    m.mul_(keep).sub_(along * x0)
    if ratio is not None:
        v.mul_(ratio)


def momentum_sums(x1: Tensor, buf: Tensor, lr: Tensor) -> Tensor:
    """The :class:`MomentumSums` of an SGD-M step, with x_k = x_{k+1} + η buf: ``(C, 3)``."""
    x0 = x1 + lr * buf
    return _columns(MomentumSums, x1x1=_dot(x1, x1), xx1=_dot(x0, x1), mx1=_dot(buf, x1))


def momentum_transport(x1: Tensor, buf: Tensor, lr: Tensor, keep: Tensor, along: Tensor) -> None:
    """R and T of SGD's momentum buffer in place: buf ← keep·buf − along·x_k."""
    x0 = x1 + lr * buf
    buf.mul_(keep).sub_(along * x0)


def adamg_sums(x1: Tensor, g: Tensor, lr: Tensor, decay_factor: Tensor) -> Tensor:
    """The :class:`AdamGSums` per row, with u_k = (x_{k+1} + η g)/(1 − ηλ) and Δ' = x_{k+1} − u_k: ``(C, 3)``."""
    u0 = (x1 + lr * g) / decay_factor
    return _columns(AdamGSums, x1x1=_dot(x1, x1), uu=_dot(u0, u0), du=_dot(x1 - u0, u0))


def adamg_direction(
    x1: Tensor, g: Tensor, lr: Tensor, decay_factor: Tensor, radial: Tensor, inv_r0_sq: Tensor, fresh: Tensor | None,
    norm: Tensor | None,
) -> Tensor:  # fmt: skip
    """y = (1−ηλ) u_k + Δ'⊥/r̂_k² (§4), or x_{k+1} itself in the ``fresh`` rows (radius not known yet).

    With ``norm`` (‖y‖ per row), write y/‖y‖ into ``x1`` and return an empty tensor; without, return the
    :class:`DirectionSums` per row: ``(C, 2)``.
    """
    u0 = (x1 + lr * g) / decay_factor
    tangent = (x1 - u0) - radial * u0
    y = decay_factor * u0 + tangent * inv_r0_sq
    if fresh is not None:
        y = torch.where(fresh, x1, y)
    if norm is not None:
        x1.copy_(y / norm)
        return x1.new_empty(0)
    return _columns(DirectionSums, yy=_dot(y, y), tt=_dot(tangent, tangent))


class Kernels:
    """The kernels, eager or compiled: each attribute is the module-level function of the same name.

    Args:
        compiled: compile with ``torch.compile(dynamic=True)``; on failure, warn once and run eagerly.
    """

    def __init__(self, compiled: bool) -> None:
        self.compiled = compiled
        self.sgd_products = self._wrap(sgd_products)
        self.adam_products = self._wrap(adam_products)
        self.adam_rewrite = self._wrap(adam_rewrite)
        self.adam_transport = self._wrap(adam_transport)
        self.momentum_sums = self._wrap(momentum_sums)
        self.momentum_transport = self._wrap(momentum_transport)
        self.adamg_sums = self._wrap(adamg_sums)
        self.adamg_direction = self._wrap(adamg_direction)

    def _wrap(self, eager: _F) -> _F:
        if not self.compiled:
            return eager
        compiled = torch.compile(eager, dynamic=True)

        def run(*args: Any) -> Any:
            if not self.compiled:
                return eager(*args)
            try:
                return compiled(*args)
            except Exception as err:
                warnings.warn(
                    f"lightning_sphere: torch.compile failed ({err!r:.200}); running the kernels eagerly", stacklevel=2
                )
                self.compiled = False
                return eager(*args)

        return run  # type: ignore[return-value]


def should_compile(numel: int, device: torch.device) -> bool:
    """Whether compiling pays: on GPUs, and for models of at least :data:`COMPILE_FROM` tracked entries."""
    return device.type == "cuda" or numel >= COMPILE_FROM
