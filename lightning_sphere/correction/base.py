"""Spherical corrections: rewrite each optimizer step on the tracked groups into its spherical form.

Applied right after a real optimizer step (its post-hook), on the tracked groups only, one algorithm
class per kind of optimizer (which one applies is the optimizer registry's call,
:mod:`lightning_sphere.optimizers`):

- :class:`~lightning_sphere.correction.adam.AdamRewrite`, Adam and AdamW (docs/theory.md §5–§6): **S**
  replaces each group's element-wise second moment by its group mean (AdamS: the mean of an EMA is the EMA of
  the mean, so torch's own ``exp_avg_sq`` keeps serving); **R** rescales the moments by r_k/r_{k+1} (second
  moment by its square) and **T** moves the momentum into the new tangent space. Modes ``"srt"`` (AdamSRT),
  ``"s"`` (AdamS), ``"rt"``.
- :class:`~lightning_sphere.correction.momentum.MomentumRewrite`, SGD with momentum: **R** and **T** on the
  momentum buffer (SGDMRT).
- :class:`~lightning_sphere.correction.adamg.AdamGRewrite`, SGD without momentum: the exact AdamG rewrite of
  §4. The weights stay at unit norm and the norm SGD would have had lives on as a per-group *virtual radius* r̂;
  the trajectory of directions and the losses are plain SGD's.

Each step has two phases with explicit state between them: :meth:`Rewrite.rewrite` returns a step
record, which :meth:`Rewrite.view` turns into what the measurement must know and :meth:`Rewrite.transport`
completes (the moments, when a measurement had to read them first). The step already taken is undone from
the optimizer's own quantities (x_k = x_{k+1} + η·step), so no copy of the weights is kept; moment
rescaling and transport act on the optimizer's state tensors in place, so that its checkpoint carries them.
Everything runs on the device with no host sync, in the fused per-row kernels of
:mod:`lightning_sphere.kernels.rewrites`, with the per-group arithmetic batched over all the modules of a rewrite.

**When the correction steps aside.** A rewrite touches only the rows a step actually moved and may
rewrite; every other row, and its optimizer state, keeps the plain optimizer's bits:

- a module torch did not step (no gradient on any of its parameters) is left alone;
- a module whose step cannot be undone (lr·weight_decay ≥ 1, see :meth:`Rewrite.cannot_invert`) or that torch
  stepped only in part takes the plain step (AdamG: on its real weights, r̂ u), with one warning;
- a group whose x_k or x_{k+1} is zero, or whose step shows a non-finite value, takes the plain step;
- a module whose normalization leaves training mode (running statistics: not invariant any more), and a
  module whose gradient shows a radial part (most of its groups above the |cos(g, x_k)| tolerance, tested
  on the device on every corrected step), are not corrected again; the first is announced at once, the
  second when the tracker next reports (:meth:`Rewrite.report`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from lightning_sphere.core.groups import InvariantGroups, ParamSlice, Stepped
from lightning_sphere.core.rows import RowIndex
from lightning_sphere.core.sharding import local
from lightning_sphere.core.tolerance import tolerance_for
from lightning_sphere.kernels.compiled import Kernels, host_float
from lightning_sphere.kernels.rewrites import AdamGSums, RewriteSums

#: One param group of a torch optimizer: its hyper-parameters, and its ``params``.
ParamGroup = dict[str, Any]


class Moments(NamedTuple):
    """An adaptive optimizer's a and b after a step (§2), as torch stores them:
    a = ``exp_avg`` · ``inv_bias1`` and b = √``exp_avg_sq`` · ``inv_sqrt_bias2`` + ε (the group's ``eps``).

    The bias corrections are 0-dim float64 tensors where the step count lives (no host sync).
    """

    exp_avg: Tensor
    exp_avg_sq: Tensor
    inv_bias1: Tensor
    inv_sqrt_bias2: Tensor


class Scheme(Protocol):
    """What an algorithm reads of the optimizer whose steps it rewrites: the generic scheme
    x_{k+1} = x_k − η a ⊘ b (docs/theory.md §2) as the optimizer registry describes it
    (:class:`~lightning_sphere.optimizers.OptimizerRule`, which the algorithms do not import)."""

    @property
    def name(self) -> str: ...

    @property
    def moments(self) -> Callable[[dict[str, Any], ParamGroup], Moments | None] | None: ...

    @property
    def decoupled_decay(self) -> Callable[[ParamGroup], bool]: ...

    def decay_factor(self, group: ParamGroup) -> float: ...


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


class StepView(NamedTuple):
    """How the measurement must read a corrected step (docs/theory.md §3 with the corrected update), per group.

    Attributes:
        b: AdamS's per-group denominator √v̂_G + ε ``(M,)``, replacing Adam's element-wise b; NaN for the
            groups the step left to Adam.
        scale: per-group factors (σ_k, σ_{k+1}), each ``(M,)``, mapping the stored weights to the virtual
            ones of the AdamG rewrite, x̃ = σ x (so ``norm`` and ``effective_lr`` report the virtual radius).
    """

    b: Tensor | None = None
    scale: tuple[Tensor, Tensor] | None = None


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
class _Stops:
    """The groups whose correction stopped for good, on the device, and what the host knows of them."""

    groups: Tensor  # (M,) bool: the gradient showed a radial part on some step
    worst: Tensor  # (M,) the largest |cos(g, x_k)| that stopped each group
    retired: dict[int, str] = field(default_factory=dict)  # module index → why it is not corrected any more
    announced: dict[int, str] = field(default_factory=dict)  # module index → why, once the host knows


class Rewrite:
    """One correction algorithm, applied after each step of one optimizer to the modules it fits.

    The per-row kernels run once per parameter; everything per group (means, inner products,
    coefficients, which groups to rewrite) runs once for all the modules together.

    Args:
        modules: the modules to rewrite, with their param groups.
        index: their rows and groups, in the same order.
        optimizer: the optimizer whose steps they are.
        mode: ``"srt"``, ``"s"`` or ``"rt"``.
        kernels: the per-row kernels to run.
        rule: the optimizer's registry entry.
        safeguards: when to step aside (see the module's docstring).
    """

    #: Hyper-parameters all param groups of one module must share for the algorithm to apply.
    shared: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        modules: Sequence[Stepped],
        index: RowIndex,
        optimizer: torch.optim.Optimizer,
        mode: str,
        kernels: Kernels,
        rule: Scheme,
        safeguards: Safeguards | None = None,
    ) -> None:
        if [m.entry for m in modules] != list(index.entries):
            raise ValueError("the row index must list the modules in their order")
        self.modules, self.index = tuple(modules), index
        self.optimizer, self.mode, self.kernels, self.rule = optimizer, mode, kernels, rule
        self.safeguards = safeguards = safeguards or Safeguards()
        #: ``(ParamSlice, param group)`` for every slice, in the index's order
        self.slices = [
            (s, group) for m in self.modules for s, group in zip(m.entry.slices, m.param_groups, strict=True)
        ]
        #: each module's slices, as a range of slice indices
        self._module_slices, start = [], 0
        for m in self.modules:
            self._module_slices.append(range(start, start + len(m.entry.slices)))
            start += len(m.entry.slices)
        #: each slice's module, as an index into ``modules``
        self._module_of_slice = [i for i, slices in enumerate(self._module_slices) for _ in slices]
        self._norms = [safeguards.norms(m.entry) or () for m in self.modules]
        device = index.device
        self._tolerance = index.per_module([safeguards.tolerance(m.entry) for m in self.modules])
        #: (8 ulps)² of each module's dtype: how far a zero x_k may come back from the undo
        self._round_off = index.per_module(
            [(8 * torch.finfo(m.entry.slices[0].param.dtype).eps) ** 2 for m in self.modules]
        )
        self._stops = _Stops(
            torch.zeros(index.num_groups, dtype=torch.bool, device=device),
            torch.zeros(index.num_groups, dtype=torch.float64, device=device),
        )
        self._masks: dict[tuple[bool, ...], Tensor] = {}
        self._blocked: dict[tuple[Any, ...], str | None] = {}
        self._warned: set[str] = set()
        self._partial: set[int] = set()  # modules torch stepped in part at least once

    @property
    def label(self) -> str:
        """The algorithm the modules now follow, for the summary."""
        raise NotImplementedError

    @property
    def notes(self) -> dict[str, str]:
        """Module name → where the correction steps aside for good, for the summary."""
        out = {}
        for i, m in enumerate(self.modules):
            reason = self._stops.retired.get(i) or self._stops.announced.get(i)
            if reason:
                out[m.entry.module_name] = reason
            elif i in self._partial:
                out[m.entry.module_name] = "plain steps whenever torch steps it only in part"
        return out

    @classmethod
    def check(cls, module: Stepped) -> str | None:
        """Why ``module`` cannot be corrected, if its param groups differ in :attr:`shared` hyper-parameters."""
        if len({tuple(repr(g.get(k)) for k in cls.shared) for g in module.param_groups}) > 1:
            return (
                f"{module.entry.module_name}: its parameters sit in param groups with different {', '.join(cls.shared)}"
            )
        return None

    @classmethod
    def cannot_invert(cls, group: ParamGroup, rule: Scheme) -> str | None:
        """Why the steps of param group ``group`` cannot be undone to rewrite them, if they cannot.

        A decoupled decay (or SGD's) scales x_k by 1 − ηλ before the step; at ηλ ≥ 1 that factor is zero or
        flips the weights, so x_k is lost (or the step is no motion on the sphere at all). ``None`` for a
        learning rate held on a device (checking it would sync; the per-group test of :meth:`verdict`
        still leaves a non-finite undo to the plain optimizer).
        """
        if not cls.decays(group, rule):
            return None
        lr, decay = host_float(group["lr"]), host_float(group["weight_decay"])
        if lr is None or decay is None or lr * decay < 1:
            return None
        return (
            f"lr={lr:g} and weight_decay={decay:g}: lr·weight_decay = {lr * decay:g} ≥ 1, so its step scales the "
            "weights by 1 − lr·weight_decay ≤ 0 and cannot be undone to rewrite it"
        )

    @classmethod
    def decays(cls, group: ParamGroup, rule: Scheme) -> bool:
        """Whether the algorithm undoes a 1 − ηλ factor for ``group``."""
        return False

    def rewrite(self, measured: bool) -> Any:
        """Turn the step just taken into the corrected one, in place; return what the later phases need.

        ``measured``: a measurement will read the step between :meth:`rewrite` and :meth:`transport`, so the
        moments it reads must stay as the step left them until then.
        """
        raise NotImplementedError

    def view(self, step: Any) -> StepView:
        """How to measure the corrected step, from :meth:`rewrite`'s record."""
        return StepView()

    def transport(self, step: Any) -> None:
        """What :meth:`rewrite` left for after the measurement (§6), in place."""

    def radii(self) -> dict[str, Tensor]:
        """Module name → its groups' virtual radii, for the algorithms that keep them."""
        return {}

    def load_radii(self, radii: dict[str, Tensor]) -> list[str]:
        """Take over what :meth:`radii` gave, for the same stored weights; returns the modules given theirs."""
        return []

    def resume(self, radii: dict[str, Tensor]) -> list[str]:
        """Take over what :meth:`radii` gave, for a model that holds the plain optimizer's weights (a
        checkpoint's); returns the modules given theirs."""
        return []

    def release(self) -> None:
        """Leave the model as the plain optimizer would have it, for the algorithms that store something else."""

    def to_real_gradients(self) -> None:
        """Give the modules the gradients of the weights the plain optimizer would have, for the algorithms that
        store other weights; :meth:`restore_gradients` undoes it."""

    def real_tensors(self) -> list[Tensor]:
        """The parameters and buffers whose stored values differ from the plain optimizer's (see
        :meth:`real_value`), for the algorithms that store other weights."""
        return []

    def real_value(self, live: Tensor, value: Tensor) -> Tensor | None:
        """The plain optimizer's value of ``live`` (one of :meth:`real_tensors`) from ``value``, its current one."""
        return None

    def restore_gradients(self) -> None:
        """Undo :meth:`to_real_gradients`, before the update consumes the gradients."""

    # ---------------------------------------------------------------- stepping aside

    def plan(self) -> Plan:
        """Which modules torch stepped and which the rewrite may touch, from Python attributes only: read
        after the step, since the step's own closure (Lightning's) computes the gradients."""
        active = tuple(s.param.grad is not None for s, _ in self.slices)
        allowed, stepped = [], []
        for i, slices in enumerate(self._module_slices):
            flags = [active[j] for j in slices]
            stepped.append(any(flags))
            allowed.append(all(flags) and self._may_rewrite(i))
            if any(flags) and not all(flags) and i not in self._partial:
                self._partial.add(i)
                idle = [self.slices[j][0].name for j in slices if not active[j]]
                self.safeguards.warn(
                    f"lightning_sphere: {self.modules[i].entry.module_name} takes the plain {self.rule.name} step "
                    f"whenever torch steps only part of it ({', '.join(idle)} had no gradient): its groups span "
                    "all of its parameters (one warning per module)"
                )
        return Plan(active, tuple(allowed), self._mask(tuple(stepped)), self._mask(tuple(allowed)))

    def _mask(self, per_module: tuple[bool, ...]) -> Tensor:
        """``(M,)`` bool of per-module flags, copied to the device once per distinct pattern."""
        if per_module not in self._masks:
            self._masks[per_module] = self.index.per_module(per_module, torch.bool)
        return self._masks[per_module]

    def _may_rewrite(self, i: int) -> bool:
        """Whether module ``i`` may be rewritten now, as far as the host can tell."""
        if i in self._stops.retired:
            return False
        for norm in self._norms[i]:
            if not norm.training:
                self._retire(i, f"{_name_of(norm, self.modules[i])} left training mode")
                return False
        group = self.modules[i].param_groups[0]
        key = (id(group), *(_version(group.get(k)) for k in ("lr", "weight_decay")))
        if key not in self._blocked:
            self._blocked[key] = self.cannot_invert(group, self.rule)
        reason = self._blocked[key]
        if reason is not None:
            name = self.modules[i].entry.module_name
            if name not in self._warned:
                self._warned.add(name)
                self.safeguards.warn(
                    f"lightning_sphere: {name} takes the plain {self.rule.name} steps while its param group has "
                    f"{reason}; its correction resumes once lr·weight_decay is below 1 (one warning per module)"
                )
            return False
        return True

    def _retire(self, i: int, reason: str, message: str | None = None) -> None:
        self._stops.retired[i] = reason
        self.safeguards.warn(
            message
            or f"lightning_sphere: {self.modules[i].entry.module_name} is not radially invariant any more ({reason}): "
            "its spherical correction stops, and it takes the plain optimizer's steps from now on"
        )

    def verdict(self, plan: Plan, sums: RewriteSums | AdamGSums, finite: Tensor) -> Tensor:
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
        stops = self._stops
        stops.worst = torch.where(lost & ~stops.groups, cos.to(stops.worst.dtype), stops.worst)
        stops.groups = stops.groups | lost
        return plan.rewrite & finite & alive & (sums.x1x1 > 0) & ~stops.groups

    def stopped(self) -> tuple[Tensor, Tensor]:
        """The device-side stops: ``(M,)`` bool and each stopped group's |cos(g, x_k)| on the step that stopped
        it, to bring to the host with the tracker's next report."""
        return self._stops.groups, self._stops.worst

    def report(self, stopped: Tensor, worst: Tensor) -> None:
        """Announce, once per module, what :meth:`verdict` stopped; ``stopped``, ``worst`` on the host."""
        for i, (m, groups) in enumerate(zip(self.modules, self.index.groups, strict=True)):
            if i in self._stops.announced or not stopped[groups].any():
                continue
            cos = worst[groups][stopped[groups] & worst[groups].isfinite()]
            if not cos.numel():  # stopped, but the host never saw a finite cosine: say so plainly
                cos = torch.zeros(1, dtype=worst.dtype)
            self._stops.announced[i] = (
                f"|cos(g, x)| up to {float(cos.max()):.2g} > {float(self._tolerance[groups.start]):.2g}"
            )
            cause, name = self.safeguards.radial_cause, m.entry.module_name
            what = f"{name}'s steps are not tangent to the sphere: {cause}" if cause else f"{name} is not radially "
            self.safeguards.warn(
                f"lightning_sphere: {what if cause else what + 'invariant any more'}. On a step since the last report, "
                f"most of its {m.entry.num_groups} groups showed {self._stops.announced[i]} (median "
                f"{float(cos.median()):.2g}, above the gradient test's δ/√d); its spherical correction stops, and it "
                "takes the plain optimizer's steps from now on"
            )
            if cause:
                self._stops.announced[i] += " (gradients clipped by value)"

    def _sum(self, plan: Plan, per_slice: Callable[[ParamSlice, ParamGroup], Tensor], width: int) -> Tensor:
        """Per-group sums ``(M, width)`` of ``per_slice`` over the slices of the allowed modules (zero elsewhere)."""
        rows = [
            per_slice(s, group)
            if plan.allowed[self._module_of_slice[j]]
            else local(s.param).new_zeros(len(s.local_channels), width)  # the kernels' dtype: the parameter's
            for j, (s, group) in enumerate(self.slices)
        ]
        return self.index.sum_rows(rows)

    def _rows(self, s: ParamSlice, *state: str) -> list[Tensor]:
        """Row views of a parameter and of its named optimizer state tensors."""
        return [s.rows(s.param.detach()), *(s.rows(self.optimizer.state[s.param][name]) for name in state)]


def _version(value: Any) -> Any:
    """A hashable stand-in for a hyper-parameter that changes when it does, without reading a tensor's value."""
    return (id(value), value._version) if isinstance(value, Tensor) else value


def _name_of(norm: nn.Module, module: Stepped) -> str:
    entry = module.entry
    kind = type(norm).__name__
    return f"{entry.norm_name} ({kind})" if entry.norm_name else kind


def _finite(sums: Tensor) -> Tensor:
    """``(M,)``: every column of a group's sums is finite."""
    return sums.isfinite().all(1)


def _transport_coefficients(x1x1: Tensor, xx1: Tensor, mx1: Tensor) -> tuple[Tensor, Tensor]:
    """keep, along with m ← keep·m − along·x_k = (⟨x_k, x_{k+1}⟩ m − ⟨m, x_{k+1}⟩ x_k) / ‖x_{k+1}‖²: with R,
    (r_k/r_{k+1}) Γ(m), Γ the transport to u_{k+1}. A zero x_{k+1} has no tangent space: its moments stay."""
    alive = x1x1 > 0
    inv = torch.where(alive, 1 / x1x1, 0)
    return torch.where(alive, xx1 * inv, 1), mx1 * inv
