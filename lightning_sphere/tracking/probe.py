"""One optimizer's armed step: the weights copied before it, the gradients read when the update is about to
consume them, and the per-row products of the step once taken (docs/theory.md §3.5).

:class:`_Probe` is what :class:`~lightning_sphere.tracking.SphereTracker` hooks into one optimizer: its step
pre-hook (:meth:`_Probe.before_step`) copies x_k when armed and arranges for the gradients to be read once the
step's closure, if any, has computed them (:meth:`_Probe.gradients_ready`); its post-hook
(:meth:`_Probe.after_step`) runs the corrections and reduces a measured step to per-group
:class:`~lightning_sphere.measurement.metrics.GroupStats`, written into the tracker's :class:`_Record` on the
device. Nothing here syncs with the host.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sphere.core.groups import ParamSlice, Stepped
from lightning_sphere.core.rows import RowIndex, math_dtype
from lightning_sphere.core.sharding import local
from lightning_sphere.correction.base import Rewrite, StepView
from lightning_sphere.correction.safeguards import Safeguards
from lightning_sphere.kernels.compiled import Kernels, host_float, scalar
from lightning_sphere.kernels.products import StepProducts
from lightning_sphere.measurement.metrics import GroupStats
from lightning_sphere.optimizers.modes import Mode, rewrite_for, unsupported
from lightning_sphere.optimizers.registry import OptimizerRule, class_path, rule_of

#: The :class:`StepProducts` columns only adaptive optimizers define (NaN before their first step).
_ADAPTIVE = slice(StepProducts._fields.index("pp"), None)


_PP = StepProducts._fields.index("pp")


#: The :class:`StepProducts` columns that involve the gradient.
_GRADIENT = [StepProducts._fields.index(name) for name in ("xg", "gg", "dg")]


@dataclass(eq=False)
class _Record:
    """The :class:`GroupStats` of the steps measured since the tracker last collected them, for all its M
    groups, on the device: every probe writes its own groups' rows (``_Probe.positions``)."""

    stats: Tensor  # (M, len(GroupStats._fields)): float64 (float32 on MPS)
    measured: Tensor  # (M,) bool: the groups a measured step wrote into ``stats`` since the last collect()
    #: a step was measured since the last collect()
    recorded: bool = False


@dataclass(frozen=True)
class _Gradients:
    """The gradients one measured step consumes, per parameter of its probe (``None``: it had none), read
    when the update is about to consume them: after the closure (training step, backward, Lightning's
    unscaling and clipping) and before the update. ``held``: for an optimizer that leaves gradients as it
    found them, the gradient tensors themselves and their version counters, checked after the step; else
    ``None``, the values being copies."""

    tensors: list[Tensor | None]
    held: list[tuple[Tensor, int] | None] | None


@dataclass(eq=False)
class _Probe:
    """The tracked modules of one optimizer, the weights copied before its measured step, and its step hooks.

    An unarmed step of an optimizer without corrections costs one flag test per hook; an armed one copies x_k
    before the step, reads (or copies) the gradients the update consumes, and after it writes the step's
    :class:`GroupStats` into ``record``.
    """

    optimizer: torch.optim.Optimizer
    rule: OptimizerRule
    modules: list[Stepped]  # ordered so that every rewrite's modules follow each other
    index: RowIndex
    positions: Tensor  # (M,): each of its groups' index among all tracked groups
    static: Tensor  # (M, 3): group_size, formula, adaptive
    kernels: Kernels
    record: _Record  # the tracker's, shared by all its probes
    warn: Callable[[str], None]
    rewrites: list[Rewrite] = field(default_factory=list)
    armed: bool = False
    snapshot: dict[Tensor, Tensor] | None = None
    #: The gradients the armed step consumes, once read (:meth:`gradients_ready`).
    gradients: _Gradients | None = None
    #: The buffers the snapshots (weights, and gradients when copied) go into, kept between logging steps:
    #: allocating them afresh would cost a page fault per page on CPUs, several times the copy itself.
    buffers: list[Tensor] = field(default_factory=list)
    gradient_buffers: list[Tensor] = field(default_factory=list)
    warned_gradient: bool = False
    #: The step in progress has read its gradients (measured, or made SGD's again for the AdamG rewrite).
    ready: bool = False
    #: The param groups as they were before the armed step (``id`` of the group → its values but ``params``): an
    #: optimizer may move its own hyper-parameters during the step (Prodigy's d).
    before: dict[int, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        optimizer: torch.optim.Optimizer,
        modules: list[tuple[int, Stepped]],
        correction: Mode | None,
        kernels: Kernels,
        safeguards: Safeguards,
        record: _Record,
    ) -> _Probe:
        """One optimizer's modules (each with the offset of its groups among all tracked groups): their row
        index, the fields of their groups that never change, and, when correcting, one rewrite per algorithm
        over the modules it fits.

        Raises:
            ValueError: if ``correction`` cannot rewrite the optimizer or one of the modules.
        """
        rule = rule_of(optimizer)
        reason = None if correction is None else unsupported(optimizer, correction)
        if reason:
            raise ValueError(reason)
        algorithms: dict[type[Rewrite] | None, list[tuple[int, Stepped]]] = {}
        for offset, module in modules:
            algorithm = None if correction is None else rewrite_for(optimizer, module.param_groups[0], correction)
            reason = None if algorithm is None else algorithm.check(module)
            if reason:
                raise ValueError(reason)
            algorithms.setdefault(algorithm, []).append((offset, module))
        ordered = [pair for pairs in algorithms.values() for pair in pairs]
        device = record.stats.device
        index = RowIndex([m.entry for _, m in ordered], device)
        positions = torch.cat([torch.arange(o, o + m.entry.num_groups) for o, m in ordered]).to(device)
        size = index.per_module([m.entry.group_size for _, m in ordered], record.stats.dtype)
        static = torch.stack([size, torch.full_like(size, rule.formula), torch.full_like(size, rule.adaptive)], 1)
        in_order = [m for _, m in ordered]
        probe = cls(optimizer, rule, in_order, index, positions, static, kernels, record, safeguards.warn)
        start = 0
        for algorithm, pairs in algorithms.items():
            if algorithm is not None:
                assert correction is not None  # an algorithm is picked only when correcting (above)
                part = index.select(start, start + len(pairs))
                probe.rewrites.append(
                    algorithm([m for _, m in pairs], part, optimizer, correction, kernels, rule, safeguards)
                )
            start += len(pairs)
        return probe

    @property
    def params(self) -> list[nn.Parameter]:
        return [s.param for s in self.index.slices]

    def arm(self, armed: bool) -> None:
        """Measure the next step (``armed``) or none; a step begun and not ended is forgotten."""
        self.armed, self.snapshot, self.gradients = armed, None, None

    def before_step(
        self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """The step pre-hook: copy x_k when armed; read the gradients now, or, when the step is given a closure
        that computes them (Lightning's, LBFGS's), right after the closure's first call."""
        if not self.armed and not self.rewrites:
            return None  # the hot path of an unarmed, uncorrected step: nothing to do
        if _nested(optimizer):
            return None  # a subclass's step() calling its base class's: both fire the hooks; the outer one acts
        self.ready = False
        for rewrite in self.rewrites:
            rewrite.before_step()
        if self.armed and self.snapshot is None:
            self.copy_weights()
        wrapped = after_closure(args, kwargs, self.gradients_ready)
        if wrapped is None:
            self.gradients_ready()
        return wrapped

    def copy_weights(self) -> None:
        """x_k: the weights copied into :attr:`buffers` before the step (``snapshot``: parameter → copy)."""
        params = [local(p) for p in self.params]  # FSDP2: this rank's shard; its rows are measured here
        self.buffers = _buffers_like(self.buffers, params)
        with torch.no_grad():
            torch._foreach_copy_(self.buffers, params)
        self.snapshot = dict(zip(self.params, self.buffers, strict=True))
        self.gradients = None
        self.before = {id(g): {k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups}

    def gradients_ready(self) -> None:
        """The gradients are the ones the update will consume: give the AdamG rewrite's modules back the
        gradients of their stored weights, and read them for an armed step. Once per step."""
        if self.ready:
            return  # a closure called again (LBFGS): the gradients of x_k were read on its first call
        self.ready = True
        with torch.no_grad():
            for rewrite in self.rewrites:
                rewrite.restore_gradients()
            if self.snapshot is not None and self.gradients is None:
                self.gradients = self._read_gradients()

    def _read_gradients(self) -> _Gradients:
        """The gradients as the update will consume them: held in place, for an optimizer known to leave them
        so, else copied (and divided by the GradScaler's scale when the optimizer unscales them itself)."""
        grads = [p.grad for p in self.params]
        scale = getattr(self.optimizer, "grad_scale", None)  # set by GradScaler.step for fused optimizers
        if self.rule.gradient_intact and scale is None:
            held = [None if g is None else (g, g._version) for g in grads]
            return _Gradients([None if g is None else local(g) for g in grads], held)
        present = [local(g) for g in grads if g is not None]
        self.gradient_buffers = _buffers_like(self.gradient_buffers, present)
        if present:
            torch._foreach_copy_(self.gradient_buffers, present)
            if scale is not None:
                torch._foreach_div_(self.gradient_buffers, scale)
        copies = iter(self.gradient_buffers)
        return _Gradients([None if g is None else next(copies) for g in grads], None)

    def after_step(self, *_: Any) -> None:
        """The step post-hook: the corrections' rewrite, the measurement of an armed step between it and their
        transport (which may change what the measurement reads), then the transport."""
        if self.snapshot is None and not self.rewrites:
            return  # the hot path of an unarmed, uncorrected step: nothing to do
        if _nested(self.optimizer):
            return  # the end of a base class's step inside a subclass's: the step is not over
        snapshot, self.snapshot = self.snapshot, None
        gradients, self.gradients = self.gradients, None
        self.ready = False
        if snapshot is not None:
            self.armed = False
            self.record.recorded = True
        with torch.no_grad():
            steps = [rewrite.rewrite(measured=snapshot is not None) for rewrite in self.rewrites]
            if snapshot is not None:
                grads = self._consumed(gradients)
                views = [r.view(step) for r, step in zip(self.rewrites, steps, strict=True)]
                self._measure(snapshot, grads, views)
            for rewrite, step in zip(self.rewrites, steps, strict=True):
                rewrite.transport(step)

    def _consumed(self, gradients: _Gradients | None) -> dict[Tensor, Tensor | None]:
        """Parameter → the gradient its update consumed, ``None`` where there was none to read (or none was
        read: a closure the optimizer never called), or where a gradient held in place changed in the step."""
        if gradients is None:
            return dict.fromkeys(self.params)
        tensors = list(gradients.tensors)
        if gradients.held is not None:
            for i, (p, held) in enumerate(zip(self.params, gradients.held, strict=True)):
                if held is not None and (p.grad is not held[0] or held[0]._version != held[1]):
                    tensors[i] = None
                    self._warn_changed()
        return dict(zip(self.params, tensors, strict=True))

    def _warn_changed(self) -> None:
        if not self.warned_gradient:
            self.warned_gradient = True
            self.warn(
                f"lightning_sphere: {class_path(type(self.optimizer))} changed or dropped p.grad in step(), which "
                "its registry entry says it leaves as it is (gradient_intact=True): the gradient metrics of that "
                "step are not logged. Register it with gradient_intact=False (one warning per optimizer)"
            )

    def _measure(
        self, snapshot: dict[Tensor, Tensor], grads: dict[Tensor, Tensor | None], views: list[StepView]
    ) -> None:
        """The :class:`GroupStats` of the step just taken, for every group of the probe, into the record."""
        rule, in_force = self.rule, self._in_force()
        targets = _targets(self, views)
        slices = [(s, group) for m in self.modules for s, group in zip(m.entry.slices, m.param_groups, strict=True)]
        per_row = [
            _row_products(self.kernels, s, snapshot[s.param], grads[s.param], self.optimizer, rule, in_force(group), *c)
            for (s, group), c in zip(slices, _view_columns(self, views), strict=True)
        ]
        stats = self.record.stats
        products = StepProducts(*self.index.sum_rows(per_row).to(stats.dtype).unbind(1))
        groups = [in_force(m.param_groups[0]) for m in self.modules]
        lengths = [
            None
            if rule.update_length is None
            else rule.update_length(g, m.entry, self.optimizer.state[m.entry.params[0]])
            for g, m in zip(groups, self.modules, strict=True)
        ]
        group_size, formula, adaptive = self.static.unbind(1)

        def per_module(values: list[float | None]) -> Tensor:
            return self.index.per_module([float("nan") if v is None else v for v in values], group_size.dtype)

        group_stats = GroupStats(
            *products,
            group_size=group_size,
            formula=formula,
            adaptive=adaptive,
            equilibrium=per_module([rule.equilibrium(g) for g in groups]) if targets is None else targets,
            decay=per_module([_decay(rule, g) for g in groups]),
            update_length=per_module([None if n is None or targets is not None else n[0] for n in lengths]),
            relative_length=per_module([None if n is None else n[1] for n in lengths]),
        )
        stats.index_copy_(0, self.positions, torch.stack(group_stats, 1))
        self.record.measured[self.positions] = True

    def _in_force(self) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """Param group → the group as the step used it (:meth:`OptimizerRule.in_force`), from its values before the
        step (those of a step measured from a tracker built during it are taken as they are after it)."""
        return lambda group: self.rule.in_force(self.before.get(id(group), group), group)


def _decay(rule: OptimizerRule, group: dict[str, Any]) -> float | None:
    """ηλ of the decoupled weight decay applied in the step, 0 for none; ``None`` where it cannot be read on the
    host (a learning rate held on a device)."""
    if not rule.decoupled_decay(group):
        return 0.0
    lr, decay = host_float(group["lr"]), host_float(rule.weight_decay(group))
    return None if lr is None or decay is None else lr * decay


#: The code of torch's hooked ``Optimizer.step`` (``Optimizer.profile_hook_step``), whose frames tell how many
#: steps of an optimizer are under way.
_HOOKED_STEP = torch.optim.Optimizer.profile_hook_step(lambda *args, **kwargs: None).__code__


def _nested(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the hooks firing now are those of a step inside another step of ``optimizer``: a subclass whose
    ``step()`` calls its base class's, both hooked by torch (the base class's once any of its instances
    exists). Read off the call stack, so that a step that raised leaves nothing behind."""
    count = 0
    frame: FrameType | None = sys._getframe(1)
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


def _targets(probe: _Probe, views: list[StepView]) -> Tensor | None:
    """``(M,)``: the angular update each group's step was made to take (§9), when a rewrite steered the step;
    ``None`` for §7's equilibria. A steered rewrite covers all the probe's modules (one mode per tracker)."""
    if not views or all(v.target is None for v in views):
        return None
    return torch.cat([v.target for v in views if v.target is not None]).to(probe.record.stats.dtype)


def _view_columns(probe: _Probe, views: list[StepView]) -> list[tuple[Tensor | None, Tensor | None, Tensor | None]]:
    """Per slice of the probe: AdamS's b and the AdamG rewrite's scales σ_k, σ_{k+1} as ``(C, 1)`` columns,
    ``None`` where the step is read as torch took it. The rewrites cover the probe's modules in order."""
    if not probe.rewrites:
        return [(None, None, None)] * len(probe.index.slices)
    columns: list[tuple[Tensor | None, Tensor | None, Tensor | None]] = []
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
        bias = (scalar(moments.inv_bias1), scalar(moments.inv_sqrt_bias2))
        eps = scalar(param_group["eps"] if moments.eps is None else moments.eps)
        products = kernels.adam_products(x, x1, g, s0, s1, scalar(lr), m, v, b, *bias, eps)
    if grad is None:
        products[:, _GRADIENT] = float("nan")
    return products
