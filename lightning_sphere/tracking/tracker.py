"""The framework-free engine: measure armed optimizer steps on the sphere, report on demand.

:class:`SphereTracker` hooks into torch optimizers. A step is measured only when the tracker is armed:
the step pre-hook copies the tracked weights (``x_k``); the gradients are read when the update is about to
consume them (right away, or after the first call of the step's closure, which computes them: docs/theory.md
§3.5), held in place for an optimizer known to leave them so, copied otherwise; the post-hook reduces the
step to per-group inner products (:class:`~lightning_sphere.measurement.metrics.GroupStats`) on the parameters' device,
and :meth:`SphereTracker.collect` turns them into per-layer summaries with one device-to-host transfer.
An unarmed step costs one Python flag test per hook; a step that never happens (an AMP step skipped for
inf/nan gradients) fires no hook and records nothing.

Plain PyTorch use (the loop of docs/guides/pytorch.md, with a logging step every 50):

>>> import torch
>>> from torch import nn
>>> from lightning_sphere import SphereTracker, find_invariant_groups
>>> _ = torch.manual_seed(0)
>>> model = nn.Sequential(
...     nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(288, 10)
... )
>>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
>>> tracker = SphereTracker(find_invariant_groups(model, torch.randn(4, 3, 8, 8)), [optimizer])
>>> for step in range(3):
...     if step % 50 == 0:
...         tracker.arm()
...     nn.functional.cross_entropy(model(torch.randn(16, 3, 8, 8)), torch.randint(0, 10, (16,))).backward()
...     optimizer.step()
...     optimizer.zero_grad()
...     if (measurement := tracker.collect()) is not None:
...         print(step, [key for key in measurement.scalars if key.startswith("sphere/effective_lr/")])
0 ['sphere/effective_lr/0', 'sphere/effective_lr/all']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_sphere.core.compat import refusal, supported
from lightning_sphere.core.groups import UNOPTIMIZED, InvariantGroups, Stepped
from lightning_sphere.core.sharding import is_dtensor
from lightning_sphere.correction.base import Rewrite
from lightning_sphere.kernels.compiled import Kernels, should_compile
from lightning_sphere.measurement.metrics import (
    HISTOGRAMS,
    METRICS,
    SKIPPED_GROUPS,
    GroupStats,
    sphere_metrics,
    valid_groups,
)
from lightning_sphere.measurement.reduce import segment_reduce
from lightning_sphere.optimizers.modes import Mode, correction_mode
from lightning_sphere.optimizers.registry import unwrap_optimizer
from lightning_sphere.tracking.probe import _Probe, _Record
from lightning_sphere.tracking.state import _real_state_dicts, _safeguards

__all__ = ["HISTOGRAMS", "UNOPTIMIZED", "Measurement", "SphereTracker"]


#: The rows of the histogrammed metrics among all metrics' per-group values.
_HISTOGRAM_ROWS = [list(METRICS).index(name) for name in HISTOGRAMS]


@dataclass
class Measurement:
    """What one measured step showed.

    Attributes:
        scalars: ``sphere/<metric>/<module name>`` and ``sphere/<metric>/all`` → value (units: see
            :data:`~lightning_sphere.measurement.metrics.METRICS`), plus ``sphere/skipped_groups/all``, the number of
            groups left out (zero norm, non-finite values). A metric undefined for a layer has no key: the
            Adam diagnostics for other optimizers, the equilibrium where §7 predicts none, gradient metrics
            when every gradient is zero.
        histograms: ``sphere_hist/<metric>/<module name>`` → the per-group values (CPU, 1-D), when asked for.
        radial: the modules most of whose measured groups showed a radial gradient on the step (|cos(g, x_k)|
            above the gradient test's δ/√d, :func:`~lightning_sphere.core.tolerance.tolerance_for`): not invariant
            any more (one eps-dominated channel alone does not count).
    """

    scalars: dict[str, float]
    histograms: dict[str, Tensor] = field(default_factory=dict)
    radial: list[str] = field(default_factory=list)


class _Transfer(NamedTuple):
    """What one logging step brings to the host, in one copy."""

    result: Tensor  # (metrics, L + 1): per layer, then all groups
    counts: Tensor  # (metrics, L + 1): the finite values behind each result
    skipped: Tensor  # (1,)
    histograms: Tensor  # (histogrammed metrics, M), or (0, M)
    stops: Tensor  # (2, groups of all rewrites): stopped (0/1) and the |cos| that stopped each
    radial: Tensor  # (L,): 1 for the modules most of whose measured groups showed a radial gradient


class SphereTracker:
    """Measures the steps of ``optimizers`` on the invariant ``groups`` (docs/theory.md §2–§5, §7), and
    optionally rewrites them into their spherical form (§4, §6; :mod:`lightning_sphere.correction`).

    Args:
        groups: the groups to track, e.g. from :func:`~lightning_sphere.find_invariant_groups`.
        optimizers: the optimizers that step them. A module whose parameters are not all in one
            optimizer is left out; the reason is in :attr:`untracked`.
        correction: ``None``, or the spherical correction to apply after every real step of the tracked
            groups: ``"srt"``, ``"s"`` or ``"rt"`` (§4–§6), ``"rotational"`` or ``"hyperball"`` (§9), or a
            :class:`~lightning_sphere.Rotational` or :class:`~lightning_sphere.Hyperball` with arguments (see
            :func:`~lightning_sphere.optimizers.rewrite_for`).
            Measurements then describe the corrected update.
        compile: run the per-row kernels compiled with ``torch.compile``; ``None`` decides by size and
            device (:func:`~lightning_sphere.kernels.should_compile`).
        model: the model the groups belong to. With it, a correction stops for a module whose normalization
            leaves training mode (BatchNorm in eval mode normalizes with running statistics, so the module is
            not invariant any more); without, only the gradient test below catches that.
        tolerance: δ of the gradient test, :func:`~lightning_sphere.core.tolerance.tolerance_for`: a corrected group's
            gradient counts as radial above δ/√d (at least 16-bit round-off for 16-bit weights or
            ``compute_dtype``); a module most of whose groups are radial on a step is not corrected again.
            ``None``: the detection's defaults.
        compute_dtype: the 16-bit dtype gradients are computed in under mixed precision, if any.
        warn: how to announce that a correction steps aside (``warnings.warn`` by default).
        gradient_clipping: ``"value"`` if the gradients are clipped entry by entry before the step
            (``clip_grad_value_``), which gives a tangent gradient a radial part: a correction stopped by a radial
            gradient then names it as the cause. Clipping by norm needs nothing here (it keeps the direction; for
            the AdamG rewrite see :meth:`to_real_gradients`).

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
        correction: Mode | None = None,
        compile: bool | None = None,
        *,
        model: nn.Module | None = None,
        tolerance: float | None = None,
        compute_dtype: torch.dtype | None = None,
        warn: Callable[[str], None] | None = None,
        gradient_clipping: str | None = None,
    ) -> None:
        correction = correction_mode(correction)
        self._safeguards = _safeguards(model, tolerance, compute_dtype, warn, gradient_clipping)
        optimizers = [unwrap_optimizer(o) for o in optimizers]
        self.groups, self.untracked, stepped = _by_optimizer(groups, optimizers)
        params = [p for entry in self.groups for p in entry.params]
        if not supported("fsdp2") and any(is_dtensor(p) for p in params):  # the plain API, Hugging Face's Trainer
            raise ValueError(f"SphereTracker: {refusal('fsdp2')}. Upgrade torch, or train on one device or with DDP")
        self.device = params[0].device if params else torch.device("cpu")
        self.kernels = Kernels(
            should_compile(sum(g.numel for g in self.groups), self.device) if compile is None else compile
        )
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        total = sum(g.num_groups for g in self.groups)
        self._record = _Record(
            torch.zeros(total, len(GroupStats._fields), dtype=dtype, device=self.device),
            torch.zeros(total, dtype=torch.bool, device=self.device),
        )
        sizes = torch.tensor([g.num_groups for g in self.groups], dtype=torch.long)
        self._segment = torch.repeat_interleave(torch.arange(len(self.groups)), sizes).to(self.device)
        #: each group's gradient-test threshold δ/√d, to tell on logging steps whether a module stays invariant
        self._radial_tolerance = torch.repeat_interleave(
            torch.tensor([self._safeguards.tolerance(g) for g in self.groups], dtype=torch.float64), sizes
        ).to(self.device, dtype)
        self._probes = [
            _Probe.build(optimizers[i], modules, correction, self.kernels, self._safeguards, self._record)
            for i, modules in stepped.items()
        ]
        self._handles = []
        for probe in self._probes:  # bound methods: an unarmed, uncorrected step costs one flag test per hook
            self._handles.append(probe.optimizer.register_step_pre_hook(probe.before_step))
            self._handles.append(probe.optimizer.register_step_post_hook(probe.after_step))
        self._handles += _real_state_dicts(model, self._rewrites)
        self._histograms = False
        self._last_values: Tensor | None = None  # the last collected step's per-group values, if not sent

    @property
    def corrections(self) -> dict[str, str]:
        """Module name → the algorithm its spherical correction makes it follow, when correcting, and where it
        stepped aside for good."""
        out = {}
        for rewrite in self._rewrites:
            notes = rewrite.notes
            for m in rewrite.modules:
                name = m.entry.module_name
                out[name] = f"{rewrite.label}; stopped: {notes[name]}" if name in notes else rewrite.label
        return out

    @property
    def _rewrites(self) -> list[Rewrite]:
        return [rewrite for probe in self._probes for rewrite in probe.rewrites]

    def radii(self) -> dict[str, Tensor]:
        """The AdamG rewrite's virtual radii, module name → ``(num_groups,)`` (NaN where the stored weights are
        the real ones). With ``model=``, every ``state_dict()`` of the model holds the real weights r̂ u (it
        loads and trains as plain SGD's model): save these radii with it, and :meth:`resume` from both to go on
        with the rewrite as if it had never stopped (without them, a new rewrite starts from the real weights:
        the same run up to the norm's eps)."""
        return {name: r for rewrite in self._rewrites for name, r in rewrite.radii().items()}

    def resume(self, radii: dict[str, Tensor]) -> list[str]:
        """Go on with the AdamG rewrite from a checkpoint: the model holds the real weights of its state dict,
        ``radii`` are :meth:`radii` as they were when it was written. Returns the modules resumed."""
        with torch.no_grad():
            return [name for rewrite in self._rewrites for name in rewrite.resume(radii)]

    def load_radii(self, radii: dict[str, Tensor]) -> list[str]:
        """Take over :meth:`radii` from a tracker of the same model closed with ``release=False`` (whose stored
        weights are still the unit-norm ones). Returns the modules given theirs."""
        return [name for rewrite in self._rewrites for name in rewrite.load_radii(radii)]

    def arm(self, histograms: bool = False) -> None:
        """Measure the next step of each optimizer (and keep the per-group values if ``histograms``).

        A step that never happens (an AMP step skipped for inf/nan gradients) leaves the optimizer armed.
        """
        for probe in self._probes:
            probe.arm(True)
        self._histograms = histograms

    def disarm(self) -> None:
        """Measure nothing until armed again."""
        for probe in self._probes:
            probe.arm(False)

    def snapshot(self, optimizer: torch.optim.Optimizer) -> None:
        """Copy the weights now, as the step pre-hook would: for a step whose pre-hook has already run. Its
        gradients are read at :meth:`gradients_ready`, which the caller must then call before the update."""
        for probe in self._probes_of(optimizer):
            for rewrite in probe.rewrites:
                rewrite.before_step()
            if probe.armed and probe.snapshot is None:
                probe.copy_weights()

    def gradients_ready(self, optimizer: torch.optim.Optimizer) -> None:
        """The gradients of ``optimizer``'s parameters are now the ones its update will consume: measure them (an
        armed step) and give the AdamG rewrite's modules back the gradients of their stored weights
        (:meth:`to_real_gradients`). Called by the step pre-hook when the step is given no closure, else after
        the closure's first call; call it yourself only for a step whose pre-hook ran before this tracker
        existed. Once per step: later calls do nothing."""
        for probe in self._probes_of(optimizer):
            probe.gradients_ready()

    def to_real_gradients(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Give the modules of the AdamG rewrite the gradients plain SGD has at their real weights, g/r̂ (the
        stored weights are u = x/r̂, whose gradient is r̂ times that, by invariance), until the next step of
        ``optimizer`` (every optimizer if ``None``) begins its update, which restores them: call it before
        anything that must see plain SGD's gradients, gradient clipping above all (a norm taken over the
        stored gradients is not plain SGD's, and neither is what it clips). Nothing to do for other
        corrections, or before a module's radius is known."""
        for probe in self._probes if optimizer is None else self._probes_of(optimizer):
            if not probe.ready:
                for rewrite in probe.rewrites:
                    rewrite.to_real_gradients()

    def _probes_of(self, optimizer: torch.optim.Optimizer) -> list[_Probe]:
        optimizer = unwrap_optimizer(optimizer)
        return [probe for probe in self._probes if probe.optimizer is optimizer]

    def close(self, release: bool = True) -> None:
        """Remove the optimizer hooks and, with ``release``, give the modules of the AdamG rewrite their real
        weights back (:meth:`release`)."""
        if release:
            self.release()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def release(self) -> None:
        """The model as plain SGD would have it: the AdamG rewrite's modules get their real weights r̂ u (and
        their BatchNorm statistics the same scale) and their radii are forgotten. Done by :meth:`close`; a
        tracker built afterwards starts from these weights."""
        with torch.no_grad():
            for rewrite in self._rewrites:
                rewrite.release()

    def collect(self) -> Measurement | None:
        """Summaries of the steps measured since the last call; ``None`` if no step was measured.

        All math stays on the device; one device-to-host transfer brings the results back.
        """
        record = self._record
        if not record.recorded:
            return None
        record.recorded = False
        with torch.no_grad():
            stats = GroupStats(*record.stats.unbind(1))
            metrics = sphere_metrics(stats)
            values = torch.stack(list(metrics.values())).masked_fill(~record.measured, float("nan"))
            skipped = (record.measured & ~valid_groups(stats)).sum(dtype=values.dtype)
            how = [metric.reduction for metric in METRICS.values()]
            result, count = segment_reduce(values, self._segment, len(self.groups), how)
            rows = _HISTOGRAM_ROWS if self._histograms else []
            self._last_values = None if self._histograms else values  # a reference: no copy, no kernel
            stopped = [torch.stack(r.stopped()).to(values) for r in self._rewrites]
            stops = torch.cat(stopped, 1) if stopped else values.new_zeros(2, 0)
            cos = values[list(METRICS).index("grad_cos")].abs()
            judged = cos.isfinite()
            votes = values.new_zeros(len(self.groups), 2).index_add_(
                0, self._segment, torch.stack([judged & (cos > self._radial_tolerance), judged], 1).to(values.dtype)
            )
            radial = (2 * votes[:, 0] > votes[:, 1]).to(values.dtype)
            transfer = _Transfer(result, count, skipped[None], values[rows], stops, radial)
            flat = torch.cat([part.flatten() for part in transfer]).cpu()
            record.measured.zero_()
        pieces = flat.split([part.numel() for part in transfer])
        host = _Transfer(*(p.view(part.shape) for p, part in zip(pieces, transfer, strict=True)))
        start = 0
        for rewrite in self._rewrites:
            groups_stopped, worst = host.stops[:, start : start + rewrite.index.num_groups]
            rewrite.report(groups_stopped.bool(), worst)
            start += rewrite.index.num_groups
        return self._unpack(host)

    def _unpack(self, host: _Transfer) -> Measurement:
        names = [entry.module_name for entry in self.groups] + ["all"]
        scalars = {}
        for metric, values, counts in zip(METRICS, host.result.tolist(), host.counts.tolist(), strict=True):
            for name, value, c in zip(names, values, counts, strict=True):
                if c > 0:
                    scalars[f"sphere/{metric}/{name}"] = value
        scalars[f"sphere/{SKIPPED_GROUPS}/all"] = float(host.skipped[0])
        radial = [entry.module_name for entry, flag in zip(self.groups, host.radial.tolist(), strict=True) if flag]
        return Measurement(scalars, self._histogram_dict(host.histograms), radial)

    def last_histograms(self) -> dict[str, Tensor]:
        """The histograms of the last collected step, when it was not armed for them (one device→host
        transfer): what to log when a run ends between two histogram steps. Empty when none are kept."""
        if self._last_values is None:
            return {}
        rows, self._last_values = self._last_values[_HISTOGRAM_ROWS].cpu(), None
        return self._histogram_dict(rows)

    def _histogram_dict(self, rows: Tensor) -> dict[str, Tensor]:
        histograms = {}
        for metric, row in zip(HISTOGRAMS, rows, strict=False):
            for entry, values in zip(self.groups, row.split([g.num_groups for g in self.groups]), strict=True):
                values = values[values.isfinite()]
                if values.numel():
                    histograms[f"sphere_hist/{metric}/{entry.module_name}"] = values
        return histograms


def _by_optimizer(
    groups: Sequence[InvariantGroups], optimizers: Sequence[torch.optim.Optimizer]
) -> tuple[list[InvariantGroups], dict[str, str], dict[int, list[tuple[int, Stepped]]]]:
    """The modules of ``groups`` whose parameters one optimizer steps: ``(tracked, untracked, stepped)`` with
    ``untracked`` module name → why not, and ``stepped`` optimizer index → its modules (with their param groups),
    each with the offset of its groups among all tracked groups (``tracked``'s order)."""
    owner: dict[Tensor, tuple[int, dict[str, Any]]] = {}
    for index, optimizer in enumerate(optimizers):
        for param_group in optimizer.param_groups:
            for p in param_group["params"]:
                owner[p] = (index, param_group)
    tracked: list[InvariantGroups] = []
    untracked: dict[str, str] = {}
    stepped: dict[int, list[tuple[int, Stepped]]] = {}
    offset = 0
    for entry in groups:
        found = [owner.get(p) for p in entry.params]
        owners = [o for o in found if o is not None]
        if len(owners) < len(found):
            untracked[entry.module_name] = UNOPTIMIZED
        elif len({o[0] for o in owners}) > 1:
            untracked[entry.module_name] = "its parameters are stepped by different optimizers"
        else:
            module = Stepped(entry, tuple(o[1] for o in owners))
            stepped.setdefault(owners[0][0], []).append((offset, module))
            tracked.append(entry)
            offset += entry.num_groups
    return tracked, untracked, stepped
