"""The per-row kernels of the two hot paths: the inner products of a measured step, and the corrections.

Each is a plain torch function of 2-D row views ``(C, n)``, one row per output channel
(:meth:`~lightning_sphere.groups.ParamSlice.rows`), returning per-row sums ``(C, k)``; combining rows
into groups and groups into coefficients happens on those small results. Scalars come as 0-dim tensors
and per-row coefficients as ``(C, 1)`` columns, so that one compiled graph serves every step.

:class:`Kernels` runs them eagerly or compiled with ``torch.compile``, which fuses every product and
reduction of a row into one pass over memory with no full-size temporaries: a tenfold speed-up on a
ResNet-18 on a CPU. Compiling costs seconds once, so it pays for large models and on GPUs; if it fails
(no compiler at hand), the eager functions take over with one warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

#: Total tracked entries from which compiling the kernels pays for its one-time cost.
COMPILE_FROM = 2**20


def _dots(pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
    return torch.stack([(a * b).sum(1) for a, b in pairs], 1)


def step_products(x: Tensor, x1: Tensor, g: Tensor, s0: Tensor, s1: Tensor) -> Tensor:
    """⟨x,x⟩ ⟨x,Δ⟩ ⟨Δ,Δ⟩ ⟨x,g⟩ ⟨g,g⟩ ⟨Δ,g⟩ per row, for x̃ = s0·x_k, x̃' = s1·x_{k+1}, g̃ = g/s0: ``(C, 6)``."""
    x, x1, g = x * s0, x1 * s1, g / s0
    d = x1 - x
    return _dots([(x, x), (x, d), (d, d), (x, g), (g, g), (d, g)])


def adam_products(
    x: Tensor, x1: Tensor, g: Tensor, s0: Tensor, s1: Tensor, m: Tensor, v: Tensor, b: Tensor | None,
    inv_bc1: Tensor, inv_sqrt_bc2: Tensor, eps: Tensor,
) -> Tensor:  # fmt: skip
    """:func:`step_products`, then ⟨b,b⟩ ⟨x,a⟩ ⟨a,a⟩ ⟨x,q⟩ ⟨q,q⟩ ⟨q,a⟩ with a = m̂, q = a ⊘ b: ``(C, 12)``.

    ``b`` is Adam's denominator √v̂ + ε, from ``v`` element-wise, or given one per row (AdamS).
    """
    a = m * inv_bc1
    b = (adam_denominator(v, inv_sqrt_bc2, eps) if b is None else b).expand_as(a)
    q = a * b.reciprocal()
    xs = x * s0
    return torch.cat([step_products(x, x1, g, s0, s1), _dots([(b, b), (xs, a), (a, a), (xs, q), (q, q), (q, a)])], 1)


def adam_denominator(v: Tensor, inv_sqrt_bc2: Tensor, eps: Tensor) -> Tensor:
    """b = √v̂ + ε, as torch's Adam computes it."""
    return v.sqrt() * inv_sqrt_bc2 + eps


def adam_rewrite(
    x1: Tensor, m: Tensor, v: Tensor, b: Tensor | None, lr: Tensor, inv_bc1: Tensor, inv_sqrt_bc2: Tensor,
    eps: Tensor, decay: Tensor,
) -> Tensor:  # fmt: skip
    """S (when ``b``, the per-row AdamS denominator, is given): replace the step torch took by AdamS's,
    in place in ``x1``. Returns ‖x_{k+1}‖², ‖x_k‖², ⟨x_k,x_{k+1}⟩, ⟨m,x_{k+1}⟩ per row: ``(C, 4)``."""
    taken = lr * m * inv_bc1 / adam_denominator(v, inv_sqrt_bc2, eps)
    step = taken if b is None else lr * m * inv_bc1 / b
    if b is not None:
        x1.add_(taken - step)
    x0 = (x1 + step) / decay  # undo the step (and AdamW's decoupled decay): x_k
    return _dots([(x1, x1), (x0, x0), (x0, x1), (m, x1)])


def adam_transport(
    x1: Tensor, m: Tensor, v: Tensor, b: Tensor | None, lr: Tensor, inv_bc1: Tensor, inv_sqrt_bc2: Tensor,
    eps: Tensor, decay: Tensor, keep: Tensor, along: Tensor, ratio: Tensor | None,
) -> None:  # fmt: skip
    """R and T in place: m ← keep·m − along·x_k, v ← ratio·v (when ``ratio`` is given)."""
    step = lr * m * inv_bc1 / (adam_denominator(v, inv_sqrt_bc2, eps) if b is None else b)
    x0 = (x1 + step) / decay
    m.mul_(keep).sub_(along * x0)
    if ratio is not None:
        v.mul_(ratio)


def momentum_products(x1: Tensor, buf: Tensor, lr: Tensor) -> Tensor:
    """‖x_{k+1}‖², ⟨x_k,x_{k+1}⟩, ⟨buf,x_{k+1}⟩ per row, with x_k = x_{k+1} + η buf (SGD-M): ``(C, 3)``."""
    x0 = x1 + lr * buf
    return _dots([(x1, x1), (x0, x1), (buf, x1)])


def momentum_transport(x1: Tensor, buf: Tensor, lr: Tensor, keep: Tensor, along: Tensor) -> None:
    """R and T of SGD's momentum buffer in place: buf ← keep·buf − along·x_k."""
    x0 = x1 + lr * buf
    buf.mul_(keep).sub_(along * x0)


def adamg_products(x1: Tensor, g: Tensor, lr: Tensor, decay: Tensor) -> Tensor:
    """‖x_{k+1}‖², ‖u_k‖², ⟨Δ',u_k⟩ per row, with u_k = (x_{k+1} + η g)/(1 − ηλ) and Δ' = x_{k+1} − u_k:
    ``(C, 3)``."""
    u0 = (x1 + lr * g) / decay
    return _dots([(x1, x1), (u0, u0), (x1 - u0, u0)])


def adamg_direction(
    x1: Tensor, g: Tensor, lr: Tensor, decay: Tensor, radial: Tensor, inv_r0_sq: Tensor, fresh: Tensor | None,
    norm: Tensor | None,
) -> Tensor:  # fmt: skip
    """y = (1−ηλ) u_k + Δ'⊥/r̂_k² (§4), or x_{k+1} itself in the ``fresh`` rows (radius not known yet).

    With ``norm`` (‖y‖ per row), write y/‖y‖ into ``x1`` and return an empty tensor; without, return
    ‖y‖², ‖Δ'⊥‖² per row: ``(C, 2)``.
    """
    u0 = (x1 + lr * g) / decay
    tangent = (x1 - u0) - radial * u0
    y = decay * u0 + tangent * inv_r0_sq
    if fresh is not None:
        y = torch.where(fresh, x1, y)
    if norm is not None:
        x1.copy_(y / norm)
        return x1.new_empty(0)
    return _dots([(y, y), (tangent, tangent)])


_KERNELS: dict[str, Callable[..., Any]] = {
    f.__name__: f
    for f in (
        step_products,
        adam_products,
        adam_denominator,
        adam_rewrite,
        adam_transport,
        momentum_products,
        momentum_transport,
        adamg_products,
        adamg_direction,
    )
}


class Kernels:
    """The kernels, eager or compiled. Attribute access gives the function to call.

    Args:
        compiled: compile with ``torch.compile(dynamic=True)``; on failure, warn once and run eagerly.
    """

    def __init__(self, compiled: bool) -> None:
        self.compiled = compiled
        self._compiled = {name: torch.compile(f, dynamic=True) for name, f in _KERNELS.items()} if compiled else {}

    def __getattr__(self, name: str) -> Callable[..., Any]:
        eager = _KERNELS[name]
        if not self.compiled:
            return eager
        compiled = self._compiled[name]

        def call(*args: Any) -> Any:
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

        return call


def should_compile(numel: int, device: torch.device) -> bool:
    """Whether compiling pays: on GPUs, and for models of at least :data:`COMPILE_FROM` tracked entries."""
    return device.type == "cuda" or numel >= COMPILE_FROM
