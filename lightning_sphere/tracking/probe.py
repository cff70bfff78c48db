"""One optimizer's armed step: the weights copied before it, the gradients read when the update is about to
consume them, and the per-row products of the step once taken (docs/theory.md §3.5).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sphere.core.groups import ParamSlice, Stepped
from lightning_sphere.core.rows import RowIndex, math_dtype
from lightning_sphere.correction.base import Rewrite, StepView
from lightning_sphere.kernels.compiled import Kernels, scalar
from lightning_sphere.kernels.products import StepProducts
from lightning_sphere.optimizers.registry import OptimizerRule

#: The :class:`StepProducts` columns only adaptive optimizers define (NaN before their first step).
_ADAPTIVE = slice(StepProducts._fields.index("pp"), None)


_PP = StepProducts._fields.index("pp")


#: The :class:`StepProducts` columns that involve the gradient.
_GRADIENT = [StepProducts._fields.index(name) for name in ("xg", "gg", "dg")]


@dataclass(eq=False)
class _Probe:
    """The tracked modules of one optimizer, and the weights copied before its measured step."""

    optimizer: torch.optim.Optimizer
    rule: OptimizerRule
    modules: list[Stepped]  # ordered so that every rewrite's modules follow each other
    index: RowIndex
    positions: Tensor  # (M,): each of its groups' index among all tracked groups
    static: Tensor  # (M, 3): group_size, formula, adaptive
    rewrites: list[Rewrite] = field(default_factory=list)
    armed: bool = False
    snapshot: dict[Tensor, Tensor] | None = None
    #: The gradients the armed step consumes, once read (:meth:`SphereTracker.gradients_ready`).
    gradients: _Gradients | None = None
    #: The buffers the snapshots (weights, and gradients when copied) go into, kept between logging steps:
    #: allocating them afresh would cost a page fault per page on CPUs, several times the copy itself.
    buffers: list[Tensor] = field(default_factory=list)
    gradient_buffers: list[Tensor] = field(default_factory=list)
    warned_gradient: bool = False
    #: The step in progress has read its gradients (measured, or made SGD's again for the AdamG rewrite).
    ready: bool = False

    @property
    def params(self) -> list[nn.Parameter]:
        return [s.param for s in self.index.slices]


@dataclass(frozen=True)
class _Gradients:
    """The gradients one measured step consumes, per parameter of its probe (``None``: it had none), read
    when the update is about to consume them: after the closure (training step, backward, Lightning's
    unscaling and clipping) and before the update. ``held``: for an optimizer that leaves gradients as it
    found them, the gradient tensors themselves and their version counters, checked after the step; else
    ``None``, the values being copies."""

    tensors: list[Tensor | None]
    held: list[tuple[Tensor, int] | None] | None


#: The code of torch's hooked ``Optimizer.step`` (``Optimizer.profile_hook_step``), whose frames tell how many
#: steps of an optimizer are under way.
_HOOKED_STEP = torch.optim.Optimizer.profile_hook_step(lambda *args, **kwargs: None).__code__


def _nested(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the hooks firing now are those of a step inside another step of ``optimizer``: a subclass whose
    ``step()`` calls its base class's, both hooked by torch (the base class's once any of its instances
    exists). Read off the call stack, so that a step that raised leaves nothing behind."""
    count, frame = 0, sys._getframe(1)
    while frame is not None:
        if frame.f_code is _HOOKED_STEP and frame.f_locals.get("self") is optimizer:
            count += 1
            if count > 1:
                return True
        frame = frame.f_back
    return False


def after_closure(
    args: tuple[Any, ...], kwargs: dict[str, Any], then: Callable[[], None]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """For a step pre-hook: the step's ``(args, kwargs)`` with its closure made to call ``then`` after its first
    call, when the step is given a closure (``args`` starts with the optimizer itself); ``None`` without one."""
    closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
    if closure is None:
        return None
    called = False

    def closure_then(*a: Any, **k: Any) -> Any:
        nonlocal called
        result = closure(*a, **k)
        if not called:
            called = True
            then()
        return result

    if "closure" in kwargs:
        return args, {**kwargs, "closure": closure_then}
    return (args[0], closure_then, *args[2:]), kwargs


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype and a.device == b.device


def _buffers_like(buffers: list[Tensor], tensors: list[Tensor]) -> list[Tensor]:
    """``buffers`` if they match ``tensors`` one for one in layout, else new ones that do."""
    if len(buffers) == len(tensors) and all(_same_layout(b, t) for b, t in zip(buffers, tensors, strict=True)):
        return buffers
    return [torch.empty_like(t, memory_format=torch.preserve_format) for t in tensors]


def _view_columns(probe: _Probe, views: list[StepView]) -> list[tuple[Tensor | None, Tensor | None, Tensor | None]]:
    """Per slice of the probe: AdamS's b and the AdamG rewrite's scales σ_k, σ_{k+1} as ``(C, 1)`` columns,
    ``None`` where the step is read as torch took it. The rewrites cover the probe's modules in order."""
    if not probe.rewrites:
        return [(None, None, None)] * len(probe.index.slices)
    columns = []
    for rewrite, view in zip(probe.rewrites, views, strict=True):
        n = len(rewrite.slices)
        b = rewrite.index.spread(view.b) if view.b is not None else [None] * n
        s0, s1 = (rewrite.index.spread(v) for v in view.scale) if view.scale is not None else ([None] * n,) * 2
        columns += zip(b, s0, s1, strict=True)
    return columns


def _row_products(
    kernels: Kernels,
    s: ParamSlice,
    x0: Tensor,
    grad: Tensor | None,
    optimizer: torch.optim.Optimizer,
    rule: OptimizerRule,
    param_group: dict[str, Any],
    b: Tensor | None,
    scale0: Tensor | None,
    scale1: Tensor | None,
) -> Tensor:
    """One parameter's :class:`StepProducts` per output channel: ``(C, 12)``.

    ``grad`` is the gradient the update consumed (``None``: it had none, and the products of the gradient are
    NaN). ``b`` replaces Adam's element-wise denominator (AdamS's, one per row); ``scale0``, ``scale1`` map the
    stored weights before and after the step to virtual ones (x̃ = σx, so g̃ = g/σ_k by invariance).
    """
    dtype = math_dtype(s.param)
    x, x1 = s.rows(x0).to(dtype), s.rows(s.param.detach()).to(dtype)
    g = torch.zeros_like(x) if grad is None else s.rows(grad).to(dtype)
    one = x.new_ones(())
    s0, s1 = (one if c is None else c.to(dtype) for c in (scale0, scale1))
    lr = param_group.get("lr", 1.0)  # an optimizer without one gets the measured η^e: P is unused
    moments = rule.moments(optimizer.state[s.param], param_group) if rule.moments is not None else None
    if moments is None:
        products = kernels.sgd_products(x, x1, g, s0, s1)
        products[:, _PP] /= lr**2
        if rule.adaptive:  # never stepped: Adam's quantities are undefined
            products[:, _ADAPTIVE] = float("nan")
    else:
        m, v = s.rows(moments.exp_avg).to(dtype), s.rows(moments.exp_avg_sq).to(dtype)
        b = None if b is None else b.to(dtype)
        bias = (moments.inv_bias1, moments.inv_sqrt_bias2)
        products = kernels.adam_products(x, x1, g, s0, s1, scalar(lr), m, v, b, *bias, scalar(param_group["eps"]))
    if grad is None:
        products[:, _GRADIENT] = float("nan")
    return products
