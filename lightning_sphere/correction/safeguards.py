"""When a spherical correction steps aside: what it needs to know (:class:`Safeguards`), and one rewrite's
safeguards at work (:class:`Guard`): per step, which modules it may touch (:meth:`Guard.plan`) and which groups
it rewrites (:meth:`Guard.verdict`); for good, which modules and groups it stopped, and why.

A rewrite touches only the rows a step actually moved and may rewrite; every other row, and its optimizer
state, keeps the plain optimizer's bits:

- a module torch did not step (no gradient on any of its parameters) is left alone;
- a module whose step cannot be undone (lr·weight_decay ≥ 1, see
  :meth:`~lightning_sphere.correction.base.Rewrite.cannot_invert`) or that torch stepped only in part takes the
  plain step (AdamG: on its real weights, r̂ u), with one warning;
- a group whose x_k or x_{k+1} is zero, or whose step shows a non-finite value, takes the plain step;
- a module whose normalization leaves training mode (running statistics: not invariant any more), and a
  module whose gradient shows a radial part (most of its groups above the |cos(g, x_k)| tolerance, tested
  on the device on every corrected step), are not corrected again; the first is announced at once, the
  second when the tracker next reports (:meth:`Guard.report`).

What the host can tell (gradients present, norms' modes, hyper-parameters) is read before any kernel runs
and costs no sync; what only the device knows (zero rows, non-finite sums, radial gradients) stays there as
``(M,)`` masks until the tracker's next report brings it over with the measurement.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_sphere.core.groups import InvariantGroups, ParamSlice, Stepped
from lightning_sphere.core.rows import RowIndex
from lightning_sphere.core.tolerance import tolerance_for
from lightning_sphere.kernels.rewrites import AdamGSums, RewriteSums, UpdateSums


@dataclass(frozen=True)
class Safeguards:
    """What a rewrite needs to know to step aside.

    Attributes:
        tolerance: module → the |cos(g, x_k)| above which a group's gradient counts as radial (a module most
            of whose groups are radial on a step is not corrected again).
        norms: module → the normalization modules whose eval mode breaks its invariance (those that then
            normalize with running statistics); ``None`` when its normalization is not known (a module named
            in ``groups=``) but the model has such normalizations.
        warn: how to announce that the correction steps aside.
    """

    tolerance: Callable[[InvariantGroups], float] = tolerance_for
    norms: Callable[[InvariantGroups], tuple[nn.Module, ...] | None] = lambda entry: ()
    warn: Callable[[str], None] = lambda message: warnings.warn(message, stacklevel=3)
    #: module → its layer's bias when the normalization cancels it (so it is not in the groups), else None
    shift: Callable[[InvariantGroups], Tensor | None] = lambda entry: None
    #: what makes the gradient the step used radial even where the layer is invariant (clipping by value), if
    #: anything: a radial gradient then stops a correction all the same, and the message names it
    radial_cause: str | None = None


class Plan(NamedTuple):
    """What a step did to a rewrite's modules, read on the host before any kernel runs (no sync).

    Attributes:
        active: per slice, whether torch stepped its parameter (it had a gradient).
        allowed: per module, whether the rewrite may touch it on this step.
        stepped: ``(M,)`` bool, the groups of the modules torch stepped, wholly or in part.
        rewrite: ``(M,)`` bool, the groups of the allowed modules.
    """

    active: tuple[bool, ...]
    allowed: tuple[bool, ...]
    stepped: Tensor
    rewrite: Tensor


@dataclass
class Stops:
    """The groups whose correction stopped for good, on the device, and what the host knows of them."""

    groups: Tensor  # (M,) bool: the gradient showed a radial part on some step
    worst: Tensor  # (M,) the largest |cos(g, x_k)| that stopped each group
    retired: dict[int, str] = field(default_factory=dict)  # module index → why it is not corrected any more
    announced: dict[int, str] = field(default_factory=dict)  # module index → why, once the host knows


class Guard:
    """One rewrite's safeguards at work (see the module's docstring).

    Args:
        modules: the rewrite's modules, with their param groups.
        index: their rows and groups, in the same order.
        slices: ``(ParamSlice, param group)`` for every slice, in the index's order.
        module_slices: each module's slices, as a range of indices into ``slices``.
        safeguards: when to step aside.
        scheme: the plain optimizer's name, for the warnings.
        cannot_invert: param group → why its steps cannot be undone, if they cannot (the algorithm's
            :meth:`~lightning_sphere.correction.base.Rewrite.cannot_invert`).
    """

    def __init__(
        self,
        modules: Sequence[Stepped],
        index: RowIndex,
        slices: Sequence[tuple[ParamSlice, dict[str, Any]]],
        module_slices: Sequence[range],
        safeguards: Safeguards,
        scheme: str,
        cannot_invert: Callable[[dict[str, Any]], str | None],
    ) -> None:
        self.modules, self.index, self.slices, self.module_slices = modules, index, slices, module_slices
        self.safeguards, self.scheme, self._cannot_invert = safeguards, scheme, cannot_invert
        self._norms = [safeguards.norms(m.entry) or () for m in modules]
        device = index.device
        self._tolerance = index.per_module([safeguards.tolerance(m.entry) for m in modules])
        #: (8 ulps)² of each module's dtype: how far a zero x_k may come back from the undo
        self._round_off = index.per_module([(8 * torch.finfo(m.entry.slices[0].param.dtype).eps) ** 2 for m in modules])
        self.stops = Stops(
            torch.zeros(index.num_groups, dtype=torch.bool, device=device),
            torch.zeros(index.num_groups, dtype=torch.float64, device=device),
        )
        self._masks: dict[tuple[bool, ...], Tensor] = {}
        self._blocked: dict[tuple[Any, ...], str | None] = {}
        self._warned: set[str] = set()
        self._partial: set[int] = set()  # modules torch stepped in part at least once

    @property
    def notes(self) -> dict[str, str]:
        """Module name → where the correction steps aside for good, for the summary."""
        out = {}
        for i, m in enumerate(self.modules):
            reason = self.stops.retired.get(i) or self.stops.announced.get(i)
            if reason:
                out[m.entry.module_name] = reason
            elif i in self._partial:
                out[m.entry.module_name] = "plain steps whenever torch steps it only in part"
        return out

    def plan(self, grads: Mapping[Tensor, Tensor | None] | None = None) -> Plan:
        """Which modules torch stepped and which the rewrite may touch, from Python attributes only: read
        after the step, since the step's own closure (Lightning's) computes the gradients. ``grads``: the gradients
        as the step found them, for an optimizer that may drop them in its step (heavyball's); else ``p.grad``."""
        active = tuple((s.param.grad if grads is None else grads.get(s.param)) is not None for s, _ in self.slices)
        allowed, stepped = [], []
        for i, slices in enumerate(self.module_slices):
            flags = [active[j] for j in slices]
            stepped.append(any(flags))
            allowed.append(all(flags) and self.may_rewrite(i))
            if any(flags) and not all(flags) and i not in self._partial:
                self._partial.add(i)
                idle = [self.slices[j][0].name for j in slices if not active[j]]
                self.safeguards.warn(
                    f"lightning_sphere: {self.modules[i].entry.module_name} takes the plain {self.scheme} step "
                    f"whenever torch steps only part of it ({', '.join(idle)} had no gradient): its groups span "
                    "all of its parameters (one warning per module)"
                )
        return Plan(active, tuple(allowed), self._mask(tuple(stepped)), self._mask(tuple(allowed)))

    def _mask(self, per_module: tuple[bool, ...]) -> Tensor:
        """``(M,)`` bool of per-module flags, copied to the device once per distinct pattern."""
        if per_module not in self._masks:
            self._masks[per_module] = self.index.per_module(per_module, torch.bool)
        return self._masks[per_module]

    def may_rewrite(self, i: int) -> bool:
        """Whether module ``i`` may be rewritten now, as far as the host can tell."""
        if i in self.stops.retired:
            return False
        for norm in self._norms[i]:
            if not norm.training:
                self.retire(i, f"{_name_of(norm, self.modules[i])} left training mode")
                return False
        group = self.modules[i].param_groups[0]
        key = (id(group), *(_version(group.get(k)) for k in ("lr", "weight_decay")))
        if key not in self._blocked:
            self._blocked[key] = self._cannot_invert(group)
        reason = self._blocked[key]
        if reason is not None:
            name = self.modules[i].entry.module_name
            if name not in self._warned:
                self._warned.add(name)
                self.safeguards.warn(
                    f"lightning_sphere: {name} takes the plain {self.scheme} steps while its param group has "
                    f"{reason}; its correction resumes once lr·weight_decay is below 1 (one warning per module)"
                )
            return False
        return True

    def retire(self, i: int, reason: str, message: str | None = None) -> None:
        """Stop correcting module ``i`` for good, for ``reason`` (the summary's note), announced at once with
        ``message`` (by default, that the module is not radially invariant any more)."""
        self.stops.retired[i] = reason
        self.safeguards.warn(
            message
            or f"lightning_sphere: {self.modules[i].entry.module_name} is not radially invariant any more ({reason}): "
            "its spherical correction stops, and it takes the plain optimizer's steps from now on"
        )

    def verdict(self, plan: Plan, sums: RewriteSums | AdamGSums | UpdateSums, finite: Tensor) -> Tensor:
        """``(M,)`` bool: the groups this step rewrites, on the device.

        A group is rewritten when its module is allowed (``plan``), the step's ``sums`` (per group) are
        ``finite``, x_{k+1} is non-zero and x_k is too: above the round-off of undoing the step (a zero x_k
        comes back from the undo as noise, eight ulps of ``undo`` at most). A module most of whose judged
        groups (those with a non-zero gradient and x_k) show a radial gradient, |cos(g, x_k)| above its
        tolerance, has lost its invariance: it is stopped for good (:meth:`report` tells the host later).
        One group alone does not stop it: a channel whose pre-norm variance is small next to the norm's eps
        is only approximately invariant and reads a few 1e-3.
        """
        xx, xg, gg = sums.xx, sums.xg, sums.gg
        alive = xx > self._round_off * sums.undo
        cos = xg.abs() / (xx * gg).sqrt()
        judged = plan.rewrite & alive & (gg > 0) & cos.isfinite()
        radial = judged & (cos > self._tolerance)
        modules = self.index.module_of_group
        votes = torch.zeros(len(self.modules), 2, dtype=torch.int32, device=cos.device)
        votes.index_add_(0, modules, torch.stack([radial, judged], 1).int())
        lost = (2 * votes[:, 0] > votes[:, 1])[modules]
        stops = self.stops
        stops.worst = torch.where(lost & ~stops.groups, cos.to(stops.worst.dtype), stops.worst)
        stops.groups = stops.groups | lost
        return plan.rewrite & finite & alive & (sums.x1x1 > 0) & ~stops.groups

    def stopped(self) -> tuple[Tensor, Tensor]:
        """The device-side stops: ``(M,)`` bool and each stopped group's |cos(g, x_k)| on the step that stopped
        it, to bring to the host with the tracker's next report."""
        return self.stops.groups, self.stops.worst

    def report(self, stopped: Tensor, worst: Tensor) -> None:
        """Announce, once per module, what :meth:`verdict` stopped; ``stopped``, ``worst`` on the host."""
        for i, (m, groups) in enumerate(zip(self.modules, self.index.groups, strict=True)):
            if i in self.stops.announced or not stopped[groups].any():
                continue
            cos = worst[groups][stopped[groups] & worst[groups].isfinite()]
            if not cos.numel():  # stopped, but the host never saw a finite cosine: say so plainly
                cos = torch.zeros(1, dtype=worst.dtype)
            worst_cos, threshold = _apart(float(cos.max()), float(self._tolerance[groups.start]))
            self.stops.announced[i] = f"|cos(g, x)| up to {worst_cos} > {threshold}"
            cause, name = self.safeguards.radial_cause, m.entry.module_name
            what = f"{name}'s steps are not tangent to the sphere: {cause}" if cause else f"{name} is not radially "
            self.safeguards.warn(
                f"lightning_sphere: {what if cause else what + 'invariant any more'}. On a step since the last report, "
                f"{_most_of(m.entry.num_groups)} showed {self.stops.announced[i]} (median "
                f"{float(cos.median()):.2g}, above the gradient test's δ/√d); its spherical correction stops, and it "
                "takes the plain optimizer's steps from now on"
            )
            if cause:
                self.stops.announced[i] += " (gradients clipped by value)"


def _apart(value: float, threshold: float) -> tuple[str, str]:
    """``value`` and the ``threshold`` it exceeds, with as many digits as it takes for them to read apart."""
    for digits in range(2, 8):
        shown = f"{value:.{digits}g}", f"{threshold:.{digits}g}"
        if shown[0] != shown[1]:
            return shown
    return shown


def _most_of(groups: int) -> str:
    return "its group" if groups == 1 else f"most of its {groups} groups"


def _version(value: Any) -> Any:
    """A hashable stand-in for a hyper-parameter that changes when it does, without reading a tensor's value."""
    return (id(value), value._version) if isinstance(value, Tensor) else value


def _name_of(norm: nn.Module, module: Stepped) -> str:
    """``norm`` as the warnings name it: the name the detection gave it and its class, or its class alone."""
    entry = module.entry
    kind = type(norm).__name__
    return f"{entry.norm_name} ({kind})" if entry.norm_name else kind
