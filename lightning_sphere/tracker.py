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

from lightning_sphere.correction import ModuleCorrection, StepView, correction_mode, unsupported
from lightning_sphere.geometry import METRICS, GroupStats, sphere_metrics, valid_groups
from lightning_sphere.groups import InvariantGroups, ParamSlice
from lightning_sphere.reduce import segment_reduce
from lightning_sphere.schemes import Scheme, adam_terms, scheme_of

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
    correction: ModuleCorrection | None = None

    @property
    def rows(self) -> slice:
        return slice(self.offset, self.offset + self.entry.num_groups)


@dataclass(eq=False)
class _Probe:
    """The tracked modules of one optimizer, and the weights copied before its measured step."""

    optimizer: torch.optim.Optimizer
    slots: list[_Slot]
    armed: bool = False
    snapshot: dict[Tensor, Tensor] | None = None

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
    def corrections(self) -> dict[str, ModuleCorrection]:
        """Module name → its spherical correction, when correcting."""
        return {slot.entry.module_name: slot.correction for slot in self._slots() if slot.correction is not None}

    def state_dict(self) -> dict[str, Tensor]:
        """The correction's own state, module name → virtual radii (AdamG rewrite); the optimizer's state
        holds the rest. Save it with your checkpoint when correcting SGD without momentum."""
        return {name: c.radius for name, c in self.corrections.items() if c.radius is not None}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for name, correction in self.corrections.items():
            if name in state:
                correction.radius = state[name].to(self.device)

    def _slots(self) -> list[_Slot]:
        return [slot for probe in self._probes for slot in probe.slots]

    def _attach_corrections(self, mode: str) -> None:
        for probe in self._probes:
            reason = unsupported(probe.optimizer, mode)
            if reason:
                raise ValueError(reason)
            for slot in probe.slots:
                slot.correction = ModuleCorrection(slot.entry, probe.optimizer, slot.param_groups, mode)
                reason = slot.correction.check()
                if reason:
                    raise ValueError(reason)

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
        with torch.no_grad():
            copies = [torch.empty_like(p) for p in params]
            torch._foreach_copy_(copies, params)
        probe.snapshot = dict(zip(params, copies, strict=True))

    def _after_step(self, probe: _Probe) -> None:
        snapshot, probe.snapshot = probe.snapshot, None
        if snapshot is not None:
            probe.armed = False
            self._recorded = True
        with torch.no_grad():
            for slot in probe.slots:
                if slot.correction is not None:
                    slot.correction.rewrite()
                if snapshot is not None:
                    view = slot.correction.view if slot.correction is not None else StepView()
                    self._stats[slot.rows] = _module_stats(probe.optimizer, slot, snapshot, view)
                    self._measured[slot.rows] = True
                if slot.correction is not None:
                    slot.correction.transport()

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


def _module_stats(
    optimizer: torch.optim.Optimizer, slot: _Slot, snapshot: dict[Tensor, Tensor], view: StepView
) -> Tensor:
    """The :class:`GroupStats` rows of one module's groups for the step just taken: ``(G, fields)``."""
    entry = slot.entry
    n = len(entry.slices)
    b = entry.expand(view.b) if view.b is not None else [None] * n
    scale0, scale1 = (entry.expand(s) for s in view.scale) if view.scale is not None else ([None] * n, [None] * n)
    block = sum(
        _slice_stats(s, snapshot[s.param], optimizer, param_group, entry.num_groups, *override)
        for s, param_group, *override in zip(entry.slices, slot.param_groups, b, scale0, scale1, strict=True)
    )
    scheme = scheme_of(optimizer, slot.param_groups[0])
    block[:, _COLUMN["dim"]] = entry.dim
    block[:, _COLUMN["formula"]] = float(scheme.formula)
    block[:, _COLUMN["adaptive"]] = float(scheme.adaptive)
    block[:, _COLUMN["equilibrium"]] = float("nan") if scheme.equilibrium is None else scheme.equilibrium
    return block


def _slice_stats(
    s: ParamSlice,
    x0: Tensor,
    optimizer: torch.optim.Optimizer,
    param_group: dict[str, Any],
    num_groups: int,
    b_override: Tensor | None = None,
    scale0: Tensor | None = None,
    scale1: Tensor | None = None,
) -> Tensor:
    """One parameter's contribution to its groups' inner products (geometry module notation).

    ``b_override`` replaces Adam's element-wise b (AdamS's per-group one); ``scale0``, ``scale1`` map the
    stored weights before and after the step to virtual ones (x̃ = σx, so g̃ = g/σ_k by invariance).
    """
    dtype = torch.float64 if s.param.dtype == torch.float64 else torch.float32
    x = x0.to(dtype)
    x1 = s.param.detach().to(dtype)
    grad = torch.zeros_like(x) if s.param.grad is None else s.param.grad.detach().to(dtype)
    if scale0 is not None:
        x, x1, grad = x * scale0, x1 * scale1, grad / scale0
    delta = x1 - x

    def sums(t: Tensor) -> Tensor:
        return s.channel_sums(t).view(num_groups, -1).sum(1)

    lr = param_group["lr"]
    columns = {
        "xx": sums(x * x),
        "xd": sums(x * delta),
        "dd": sums(delta * delta),
        "xg": sums(x * grad),
        "gg": sums(grad * grad),
        "dg": sums(delta * grad),
    }
    scheme: Scheme = scheme_of(optimizer, param_group)
    terms = adam_terms(optimizer.state[s.param], param_group) if scheme.adaptive else None
    if terms is not None:
        a, b = terms
        a = a.to(dtype)
        b = (b if b_override is None else b_override.expand_as(b)).to(dtype)
        q = a / b  # s = η q, P = b / η
        columns |= {
            "pp": sums(b * b) / lr**2,
            "xa": sums(x * a),
            "aa": sums(a * a),
            "xs": sums(x * q) * lr,
            "ss": sums(q * q) * lr**2,
            "sa": sums(q * a) * lr,
        }
    elif scheme.adaptive:  # never stepped: Adam's quantities are undefined
        nan = x.new_full((num_groups,), float("nan"))
        columns |= dict.fromkeys(("pp", "xa", "aa", "xs", "ss", "sa"), nan)
    else:  # b ≡ 1: P = 1/η on every entry
        columns["pp"] = x.new_full((num_groups,), s.param.numel() / num_groups) / lr**2
    zero = x.new_zeros(num_groups)
    return torch.stack([columns.get(name, zero) for name in _FIELDS], 1)
