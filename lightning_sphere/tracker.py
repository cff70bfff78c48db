"""The framework-free engine: measure armed optimizer steps on the sphere, report on demand.

:class:`SphereTracker` hooks into torch optimizers. A step is measured only when the tracker is armed:
the step pre-hook copies the tracked weights (``x_k``), the post-hook reduces the step to per-group
inner products (:class:`~lightning_sphere.geometry.GroupStats`) on the parameters' device, and
:meth:`SphereTracker.collect` turns them into per-layer summaries with one device-to-host transfer.
An unarmed step costs one Python flag test per hook; a step that never happens (an AMP step skipped for
inf/nan gradients) fires no hook and records nothing.

Plain PyTorch use::

    tracker = SphereTracker(find_invariant_groups(model, example_input), [optimizer])
    for step, (x, y) in enumerate(loader):
        if step % 50 == 0:
            tracker.arm()
        loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if (measurement := tracker.collect()) is not None:
            print(measurement.scalars["sphere/effective_lr/all"])
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sphere.correction import Member, Rewrite, StepView, correction_mode, unsupported
from lightning_sphere.geometry import METRICS, GroupStats, sphere_metrics, valid_groups
from lightning_sphere.groups import InvariantGroups, ParamSlice, math_dtype
from lightning_sphere.kernels import Kernels, should_compile
from lightning_sphere.reduce import segment_reduce
from lightning_sphere.schemes import Scheme, adam_state, scheme_of

#: How each metric is summarized over the groups of a layer (and over all groups).
REDUCTION = {
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
    "angular_update_equilibrium": "mean",
}
#: Metrics whose per-group distribution is reported as a histogram.
HISTOGRAMS = ("effective_lr", "angular_update", "norm")

#: Why a module whose parameters no optimizer steps is not tracked.
UNOPTIMIZED = "not stepped by any optimizer"

_FIELDS = GroupStats._fields
_COLUMN = {name: i for i, name in enumerate(_FIELDS)}


@dataclass
class Measurement:
    """What one measured step showed.

    Attributes:
        scalars: ``sphere/<metric>/<module name>`` and ``sphere/<metric>/all`` → value, plus
            ``sphere/skipped_groups/all``, the number of groups left out (zero norm, non-finite values).
            A metric undefined for a layer has no key: the Adam diagnostics for other optimizers, the
            equilibrium where §7 predicts none, gradient metrics when every gradient is zero.
        histograms: ``sphere_hist/<metric>/<module name>`` → the per-group values (CPU), when asked for.
    """

    scalars: dict[str, float]
    histograms: dict[str, Tensor] = field(default_factory=dict)


@dataclass(eq=False)
class _Slot:
    """A tracked module, inside the optimizer that steps it."""

    entry: InvariantGroups
    offset: int  # index of its first group among all tracked groups
    param_groups: tuple[dict[str, Any], ...]  # the optimizer param group of each slice
    correction: Member | None = None  # its place in the spherical correction, when correcting


@dataclass(eq=False)
class _Probe:
    """The tracked modules of one optimizer, and the weights copied before its measured step."""

    optimizer: torch.optim.Optimizer
    slots: list[_Slot]
    rewrites: list[Rewrite] = field(default_factory=list)
    armed: bool = False
    groups: Tensor | None = None  # the indices of its groups among all tracked groups
    row_group: Tensor | None = None  # for every row of every slice, its group among the probe's
    static: Tensor | None = None  # the dim, formula and adaptive fields of its groups
    snapshot: dict[Tensor, Tensor] | None = None
    #: The buffers the snapshots are copied into, kept between logging steps: allocating them afresh
    #: would cost a page fault per page on CPUs, several times the copy itself.
    buffers: list[Tensor] = field(default_factory=list)

    @property
    def params(self) -> list[nn.Parameter]:
        return [s.param for slot in self.slots for s in slot.entry.slices]


class SphereTracker:
    """Measures the steps of ``optimizers`` on the invariant ``groups`` (THEORY.md §2–§5, §7), and
    optionally rewrites them into their spherical form (§4, §6; :mod:`lightning_sphere.correction`).

    Args:
        groups: the groups to track, e.g. from :func:`~lightning_sphere.find_invariant_groups`.
        optimizers: the optimizers that step them. A module whose parameters are not all in one
            optimizer is left out; the reason is in :attr:`untracked`.
        correction: ``None``, or the spherical correction to apply after every real step of the tracked
            groups: ``"srt"``, ``"s"`` or ``"rt"`` (see :func:`~lightning_sphere.correction.unsupported`).
            Measurements then describe the corrected update.
        compile: run the per-row kernels compiled with ``torch.compile``; ``None`` decides by size and
            device (:func:`~lightning_sphere.kernels.should_compile`).

    Attributes:
        groups: the tracked modules, in the order of the per-group tensors.
        untracked: module name → why it is not tracked.

    Raises:
        ValueError: if ``correction`` cannot rewrite one of the optimizers or modules.
    """

    def __init__(
        self,
        groups: Sequence[InvariantGroups],
        optimizers: Sequence[torch.optim.Optimizer],
        correction: str | None = None,
        compile: bool | None = None,
    ) -> None:
        owner: dict[Tensor, tuple[int, dict[str, Any]]] = {}
        for index, optimizer in enumerate(optimizers):
            for param_group in optimizer.param_groups:
                for p in param_group["params"]:
                    owner[p] = (index, param_group)
        self.groups: list[InvariantGroups] = []
        self.untracked: dict[str, str] = {}
        slots: dict[int, list[_Slot]] = defaultdict(list)
        offset = 0
        for entry in groups:
            owners = [owner.get(p) for p in entry.params]
            if any(o is None for o in owners):
                self.untracked[entry.module_name] = UNOPTIMIZED
            elif len({o[0] for o in owners}) > 1:
                self.untracked[entry.module_name] = "its parameters are stepped by different optimizers"
            else:
                slots[owners[0][0]].append(_Slot(entry, offset, tuple(o[1] for o in owners)))
                self.groups.append(entry)
                offset += entry.num_groups
        params = [p for entry in self.groups for p in entry.params]
        self.device = params[0].device if params else torch.device("cpu")
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self._stats = torch.zeros(offset, len(_FIELDS), dtype=dtype, device=self.device)
        self._measured = torch.zeros(offset, dtype=torch.bool, device=self.device)
        sizes = torch.tensor([g.num_groups for g in self.groups], dtype=torch.long)
        self._segment = torch.repeat_interleave(torch.arange(len(self.groups)), sizes).to(self.device)
        self._probes = [_Probe(optimizers[i], s) for i, s in slots.items()]
        for probe in self._probes:
            self._index(probe)
        numel = sum(g.numel for g in self.groups)
        self.kernels = Kernels(should_compile(numel, self.device) if compile is None else compile)
        if correction is not None:
            self._attach_corrections(correction_mode(correction))
        self._handles = []
        for probe in self._probes:
            self._handles.append(probe.optimizer.register_step_pre_hook(lambda *_, p=probe: self._before_step(p)))
            self._handles.append(probe.optimizer.register_step_post_hook(lambda *_, p=probe: self._after_step(p)))
        self._histograms = False
        self._recorded = False

    @property
    def num_groups(self) -> int:
        return self._stats.shape[0]

    @property
    def corrections(self) -> dict[str, str]:
        """Module name → the algorithm its spherical correction makes it follow, when correcting."""
        return {m.entry.module_name: r.label for probe in self._probes for r in probe.rewrites for m in r.members}

    def state_dict(self) -> dict[str, Tensor]:
        """The correction's own state, module name → virtual radii (AdamG rewrite); the optimizer's state
        holds the rest. Save it with your checkpoint when correcting SGD without momentum."""
        return {name: r for probe in self._probes for rewrite in probe.rewrites for name, r in rewrite.radii().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for probe in self._probes:
            for rewrite in probe.rewrites:
                rewrite.load_radii(state)

    def _index(self, probe: _Probe) -> None:
        """Where each row of the probe's parameters goes, and the fields of its groups that never change."""
        groups, row_group, static, offset = [], [], [], 0
        for slot in probe.slots:
            g = slot.entry.num_groups
            groups.append(torch.arange(slot.offset, slot.offset + g))
            row_group += [(torch.arange(g) + offset).repeat_interleave(s.num_channels // g) for s in slot.entry.slices]
            scheme = scheme_of(probe.optimizer, slot.param_groups[0])
            static.append(
                torch.tensor([[slot.entry.dim, scheme.formula, scheme.adaptive]], dtype=torch.float64).expand(g, 3)
            )
            offset += g
        probe.groups = torch.cat(groups).to(self.device)
        probe.row_group = torch.cat(row_group).to(self.device)
        probe.static = torch.cat(static).to(self.device, self._stats.dtype)

    def _attach_corrections(self, mode: str) -> None:
        for probe in self._probes:
            reason = unsupported(probe.optimizer, mode)
            if reason:
                raise ValueError(reason)
            kinds: dict[str, list[_Slot]] = defaultdict(list)
            for slot in probe.slots:
                kind = _rewrite_kind(probe.optimizer, slot.param_groups[0])
                reason = Rewrite.check(kind, slot.entry, slot.param_groups)
                if reason:
                    raise ValueError(reason)
                kinds[kind].append(slot)
            for kind, slots in kinds.items():
                modules = [(slot.entry, slot.param_groups) for slot in slots]
                rewrite = Rewrite(kind, modules, probe.optimizer, mode, self.kernels, self.device)
                for slot, member in zip(slots, rewrite.members, strict=True):
                    slot.correction = member
                probe.rewrites.append(rewrite)

    def arm(self, histograms: bool = False) -> None:
        """Measure the next step of each optimizer (and keep the per-group values if ``histograms``).

        A step that never happens (an AMP step skipped for inf/nan gradients) leaves the optimizer armed.
        """
        for probe in self._probes:
            probe.armed, probe.snapshot = True, None
        self._histograms = histograms

    def disarm(self) -> None:
        """Measure nothing until armed again."""
        for probe in self._probes:
            probe.armed, probe.snapshot = False, None

    def snapshot(self, optimizer: torch.optim.Optimizer) -> None:
        """Copy the weights now, as the step pre-hook would: for a step whose pre-hook has already run."""
        for probe in self._probes:
            if probe.optimizer is optimizer:
                self._before_step(probe)

    def close(self) -> None:
        """Remove the optimizer hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _before_step(self, probe: _Probe) -> None:
        if not probe.armed or probe.snapshot is not None:
            return
        params = probe.params
        if not all(_same_layout(b, p) for b, p in zip(probe.buffers, params, strict=False)) or not probe.buffers:
            probe.buffers = [torch.empty_like(p, memory_format=torch.preserve_format) for p in params]
        with torch.no_grad():
            torch._foreach_copy_(probe.buffers, params)
        probe.snapshot = dict(zip(params, probe.buffers, strict=True))

    def _after_step(self, probe: _Probe) -> None:
        snapshot, probe.snapshot = probe.snapshot, None
        if snapshot is None and not probe.rewrites:
            return  # the hot path of an unarmed, uncorrected step: nothing to do
        if snapshot is not None:
            probe.armed = False
            self._recorded = True
        with torch.no_grad():
            for rewrite in probe.rewrites:
                rewrite.rewrite()
            if snapshot is not None:
                self._measure(probe, snapshot)
            for rewrite in probe.rewrites:
                rewrite.transport()

    def _measure(self, probe: _Probe, snapshot: dict[Tensor, Tensor]) -> None:
        """The :class:`GroupStats` of the step just taken, for every group of the probe, into ``_stats``."""
        per_row, equilibrium = [], []
        for slot in probe.slots:
            entry, view = slot.entry, slot.correction.view if slot.correction is not None else StepView()
            scales = view.scale if view.scale is not None else (None, None)
            columns = [entry.row_columns(v) if v is not None else [None] * len(entry.slices) for v in (view.b, *scales)]
            for s, param_group, *overrides in zip(entry.slices, slot.param_groups, *columns, strict=True):
                per_row.append(_row_stats(self.kernels, s, snapshot[s.param], probe.optimizer, param_group, *overrides))
            eq = scheme_of(probe.optimizer, slot.param_groups[0]).equilibrium
            equilibrium.append(
                torch.full((entry.num_groups, 1), float("nan") if eq is None else eq, dtype=torch.float64)
            )
        rows = torch.cat(per_row)
        products = rows.new_zeros(len(probe.groups), rows.shape[1]).index_add_(0, probe.row_group, rows)
        block = torch.cat([products.to(self._stats.dtype), probe.static, torch.cat(equilibrium).to(probe.static)], 1)
        self._stats.index_copy_(0, probe.groups, block)
        self._measured[probe.groups] = True

    def collect(self) -> Measurement | None:
        """Summaries of the steps measured since the last call; ``None`` if no step was measured.

        All math stays on the device; one device-to-host transfer brings the results back.
        """
        if not self._recorded:
            return None
        self._recorded = False
        with torch.no_grad():
            stats = GroupStats(*self._stats.unbind(1))
            metrics = sphere_metrics(stats)
            values = torch.stack([metrics[name] for name in METRICS]).masked_fill(~self._measured, float("nan"))
            skipped = (self._measured & ~valid_groups(stats)).sum(dtype=values.dtype)
            result, count = segment_reduce(values, self._segment, len(self.groups), [REDUCTION[m] for m in METRICS])
            parts = [result.flatten(), count.flatten(), skipped[None]]
            if self._histograms:
                parts.append(values[[METRICS.index(m) for m in HISTOGRAMS]].flatten())
            host = torch.cat(parts).cpu()
            self._measured.zero_()
        return self._unpack(host)

    def _unpack(self, host: Tensor) -> Measurement:
        n, columns = len(METRICS), len(self.groups) + 1
        result, count = host[: n * columns].view(n, columns), host[n * columns : 2 * n * columns].view(n, columns)
        names = [entry.module_name for entry in self.groups] + ["all"]
        scalars = {}
        for metric, values, counts in zip(METRICS, result.tolist(), count.tolist(), strict=True):
            for name, value, c in zip(names, values, counts, strict=True):
                if c > 0:
                    scalars[f"sphere/{metric}/{name}"] = value
        scalars["sphere/skipped_groups/all"] = float(host[2 * n * columns])
        histograms = {}
        if host.numel() > 2 * n * columns + 1:
            per_group = host[2 * n * columns + 1 :].view(len(HISTOGRAMS), -1)
            for metric, row in zip(HISTOGRAMS, per_group, strict=True):
                for entry, values in zip(self.groups, row.split([g.num_groups for g in self.groups]), strict=True):
                    values = values[values.isfinite()]
                    if values.numel():
                        histograms[f"sphere_hist/{metric}/{entry.module_name}"] = values
        return Measurement(scalars, histograms)


def _rewrite_kind(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> str:
    if type(optimizer) is torch.optim.SGD:
        return "sgdm" if group["momentum"] else "adamg"
    return "adam"


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype and a.device == b.device


def _row_stats(
    kernels: Kernels,
    s: ParamSlice,
    x0: Tensor,
    optimizer: torch.optim.Optimizer,
    param_group: dict[str, Any],
    b: Tensor | None,
    scale0: Tensor | None,
    scale1: Tensor | None,
) -> Tensor:
    """One parameter's contribution to its groups' inner products xx … sa, per output channel: ``(C, 12)``.

    ``b`` replaces Adam's element-wise denominator (AdamS's, one per row); ``scale0``, ``scale1`` map the
    stored weights before and after the step to virtual ones (x̃ = σx, so g̃ = g/σ_k by invariance).
    """
    dtype = math_dtype(s.param)
    x, x1 = s.rows(x0).to(dtype), s.rows(s.param.detach()).to(dtype)
    g = torch.zeros_like(x) if s.param.grad is None else s.rows(s.param.grad.detach()).to(dtype)
    one = x.new_ones(())
    s0, s1 = (one if c is None else c.to(dtype) for c in (scale0, scale1))
    lr = param_group["lr"]
    scheme: Scheme = scheme_of(optimizer, param_group)
    terms = adam_state(optimizer.state[s.param], param_group) if scheme.adaptive else None
    if terms is not None:
        m, v, inv_bc1, inv_sqrt_bc2 = terms
        eps = torch.tensor(param_group["eps"], dtype=torch.float64)
        b = None if b is None else b.to(dtype)
        rows = kernels.adam_products(
            x, x1, g, s0, s1, s.rows(m).to(dtype), s.rows(v).to(dtype), b, inv_bc1, inv_sqrt_bc2, eps
        )
        # pp = ‖b‖²/η², xs = η⟨x,q⟩, ss = η²‖q‖², sa = η⟨q,a⟩ (s = η q, P = b/η); η = 0 gives pp = inf
        eta, one = torch.as_tensor(lr, dtype=torch.float64), torch.ones((), dtype=torch.float64)
        factors = torch.stack([one] * 6 + [1 / eta**2, one, one, eta, eta**2, eta])
        return rows * factors.to(rows)
    rows = kernels.step_products(x, x1, g, s0, s1)
    if scheme.adaptive:  # never stepped: Adam's quantities are undefined
        return torch.cat([rows, rows.new_full((len(rows), 6), float("nan"))], 1)
    pp = rows.new_full((len(rows), 1), x.shape[1]) / lr**2  # b ≡ 1: P = 1/η on every entry
    return torch.cat([rows, pp, rows.new_zeros(len(rows), 5)], 1)
