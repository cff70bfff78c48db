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

Notation (docs/theory.md §1–§2): ``x = x_k``, ``x1 = x_{k+1}``, ``Δ = x1 − x``, ``g`` the gradient, ``a`` the
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


def host_float(value: Any) -> float | None:
    """A hyper-parameter as a Python float without a device sync; ``None`` for a tensor held on a device."""
    if isinstance(value, Tensor):
        return float(value) if value.device.type == "cpu" else None
    return None if value is None else float(value)


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
    if keep is not None:
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
    if norm is not None:
        real = r0 * (x1 + step) - step / r0
        x1.copy_(torch.where(mask, y / norm, torch.where(back, real, x1)))
        return x1.new_empty(0)
    return _dot(y, y)[:, None]


def scale_rows(g: Tensor, factor: Tensor) -> None:
    """g ← factor·g in place, ``factor`` a ``(C, 1)`` column (the AdamG rewrite's conversions between the
    gradients of the stored and of the real weights)."""
    g.mul_(factor)


class Kernels:
    """The kernels, eager or compiled: each attribute is the module-level function of the same name.

    Args:
        compiled: compile with ``torch.compile(dynamic=True)``; on failure, warn once and run eagerly.
    """

    def __init__(self, compiled: bool) -> None:
        self.compiled = compiled
        self.sgd_products = self._wrap(sgd_products)
        self.adam_products = self._wrap(adam_products)
        self.adam_sums = self._wrap(adam_sums)
        self.adam_apply = self._wrap(adam_apply)
        self.momentum_sums = self._wrap(momentum_sums)
        self.momentum_transport = self._wrap(momentum_transport)
        self.adamg_sums = self._wrap(adamg_sums)
        self.adamg_direction = self._wrap(adamg_direction)
        self.scale_rows = self._wrap(scale_rows)

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
