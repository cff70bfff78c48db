"""Spherical corrections: rewrite each optimizer step on the tracked groups into its spherical form.

Applied right after a real optimizer step (its post-hook), on the tracked groups only, one algorithm
class per kind of optimizer (which one applies is the optimizer registry's call,
:mod:`lightning_sphere.schemes`):

- :class:`AdamRewrite`, Adam and AdamW (docs/theory.md §5–§6): **S** replaces each group's element-wise second
  moment by its group mean (AdamS: the mean of an EMA is the EMA of the mean, so torch's own ``exp_avg_sq``
  keeps serving); **R** rescales the moments by r_k/r_{k+1} (second moment by its square) and **T** moves
  the momentum into the new tangent space. Modes ``"srt"`` (AdamSRT), ``"s"`` (AdamS), ``"rt"``.
- :class:`MomentumRewrite`, SGD with momentum: **R** and **T** on the momentum buffer (SGDMRT).
- :class:`AdamGRewrite`, SGD without momentum: the exact AdamG rewrite of §4. The weights stay at unit
  norm and the norm SGD would have had lives on as a per-group *virtual radius* r̂; the trajectory of
  directions and the losses are plain SGD's.

Each step has two phases with explicit state between them: :meth:`Rewrite.rewrite` returns a step
record, which :meth:`Rewrite.view` turns into what the measurement must know and :meth:`Rewrite.transport`
completes (the moments, when a measurement had to read them first). The step already taken is undone from
the optimizer's own quantities (x_k = x_{k+1} + η·step), so no copy of the weights is kept; moment
rescaling and transport act on the optimizer's state tensors in place, so that its checkpoint carries them.
Everything runs on the device with no host sync, in the fused per-row kernels of
:mod:`lightning_sphere.kernels`, with the per-group arithmetic batched over all the modules of a rewrite.

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
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from lightning_sphere.distributed import local
from lightning_sphere.groups import InvariantGroups, ParamSlice, RowIndex, Stepped, tolerance_for
from lightning_sphere.kernels import AdamGSums, Kernels, RewriteSums, host_float, scalar

if TYPE_CHECKING:
    from lightning_sphere.schemes import OptimizerRule, ParamGroup


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
        rule: OptimizerRule,
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
    def cannot_invert(cls, group: ParamGroup, rule: OptimizerRule) -> str | None:
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
    def decays(cls, group: ParamGroup, rule: OptimizerRule) -> bool:
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


class AdamStep(NamedTuple):
    """What :class:`AdamRewrite` carries from the rewrite to the transport."""

    sums: RewriteSums  # per group
    mask: Tensor  # (M,) bool: the groups rewritten
    root: Tensor | None  # AdamS: √v̂_G per group, the group denominator less ε
    plan: Plan
    pending: bool  # R and T still to do (a measurement read the moments first)


class AdamRewrite(Rewrite):
    """AdamS, AdamSRT or Adam + R + T on Adam and AdamW (§5–§6)."""

    shared = ("betas", "eps")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._group_size = self.index.per_module([m.entry.group_size for m in self.modules], torch.float32)

    @property
    def label(self) -> str:
        return {"srt": "AdamSRT", "s": "AdamS", "rt": "Adam+RT"}[self.mode]

    @classmethod
    def decays(cls, group: ParamGroup, rule: OptimizerRule) -> bool:
        return rule.decoupled_decay(group) and group["weight_decay"] != 0

    def rewrite(self, measured: bool) -> AdamStep:
        plan = self.plan()
        root = self._group_root(plan) if "s" in self.mode else None
        args = self._args(plan, root)
        sums = self._sum(plan, lambda s, group: self.kernels.adam_sums(*args[s]), len(RewriteSums._fields))
        mask = self.verdict(plan, RewriteSums(*sums.unbind(1)), _finite(sums) & _finite_root(root))
        step = AdamStep(RewriteSums(*sums.unbind(1)), mask, root, plan, pending=measured and self.mode != "s")
        if measured and "s" in self.mode:
            self._apply(step, args, transport=False)  # the measurement reads x_{k+1} rewritten, moments as they are
        elif not measured:
            self._apply(step, args, transport=self.mode != "s")
        return step

    def view(self, step: AdamStep) -> StepView:
        if step.root is None:
            return StepView()
        eps = self.index.per_module([m.param_groups[0]["eps"] for m in self.modules])
        return StepView(b=torch.where(step.mask, step.root + eps, float("nan")))

    def transport(self, step: AdamStep) -> None:
        if step.pending:  # rows read afresh: S may have written x_{k+1} through a copy
            self._apply(step, self._args(step.plan, step.root), transport=True, rewritten=True)

    def _apply(
        self, step: AdamStep, args: dict[ParamSlice, tuple[Any, ...]], transport: bool, rewritten: bool = False
    ) -> None:
        """One pass over the allowed rows (``args``, from :meth:`_args`): S (unless ``rewritten`` already) and, if
        ``transport``, R and T."""
        s = step.sums
        keep = along = ratio = None
        if transport:
            keep, along = _transport_coefficients(s.x1x1, s.xx1, s.mx1)
            ratio = torch.where(s.x1x1 > 0, s.xx / s.x1x1, 1)  # (r_k/r_{k+1})²
        spread = self.index.spread
        columns = [spread(c) if c is not None else [None] * len(self.slices) for c in (keep, along, ratio)]
        for j, ((s, _), mask) in enumerate(zip(self.slices, spread(step.mask), strict=True)):
            if s not in args:
                continue
            x1, m, v, b, *scalars = args[s][:3] + args[s][4:]
            self.kernels.adam_apply(x1, m, v, b, *scalars, mask, rewritten, *(c[j] for c in columns))
            state = self.optimizer.state[s.param]
            s.write_rows(s.param.detach(), x1)
            s.write_rows(state["exp_avg"], m)
            s.write_rows(state["exp_avg_sq"], v)

    def _group_root(self, plan: Plan) -> Tensor:
        """√v̂_G, v_G the group mean of the bias-corrected second moment (§6)."""

        def per_slice(s: ParamSlice, group: ParamGroup) -> Tensor:
            moments = self.rule.moments(self.optimizer.state[s.param], group)
            return s.rows(moments.exp_avg_sq).sum(1, keepdim=True) * moments.inv_sqrt_bias2.square()

        return (self._sum(plan, per_slice, 1)[:, 0] / self._group_size).sqrt()

    def _args(self, plan: Plan, root: Tensor | None) -> dict[ParamSlice, tuple[Any, ...]]:
        """Per slice of an allowed module: x_{k+1}, m, v, g rows, AdamS's b per row, and the scalars of the
        step torch took."""
        roots = self.index.spread(root) if root is not None else [None] * len(self.slices)
        out = {}
        for j, ((s, group), r) in enumerate(zip(self.slices, roots, strict=True)):
            if not plan.allowed[self._module_of_slice[j]]:
                continue
            x1, m, v = self._rows(s, "exp_avg", "exp_avg_sq")
            moments = self.rule.moments(self.optimizer.state[s.param], group)
            b = None if r is None else r + group["eps"]
            lr, eps, decay_factor = scalar(group["lr"]), scalar(group["eps"]), scalar(self.rule.decay_factor(group))
            g = s.rows(s.param.grad)
            out[s] = (x1, m, v, g, b, lr, moments.inv_bias1, moments.inv_sqrt_bias2, eps, decay_factor)
        return out


def _finite_root(root: Tensor | None) -> Tensor | bool:
    return True if root is None else root.isfinite()


class MomentumStep(NamedTuple):
    """What :class:`MomentumRewrite` carries from the rewrite to the transport."""

    sums: RewriteSums
    mask: Tensor
    plan: Plan


class MomentumRewrite(Rewrite):
    """SGDMRT: R and T on SGD's momentum buffer (§6)."""

    shared = ("momentum", "dampening")

    @property
    def label(self) -> str:
        return "SGDMRT"

    def rewrite(self, measured: bool) -> MomentumStep:
        plan = self.plan()

        def per_slice(s: ParamSlice, group: ParamGroup) -> Tensor:
            x1, buf = self._rows(s, "momentum_buffer")
            return self.kernels.momentum_sums(x1, buf, s.rows(s.param.grad), scalar(group["lr"]))

        sums = self._sum(plan, per_slice, len(RewriteSums._fields))
        mask = self.verdict(plan, RewriteSums(*sums.unbind(1)), _finite(sums))
        return MomentumStep(RewriteSums(*sums.unbind(1)), mask, plan)

    def transport(self, step: MomentumStep) -> None:
        keep, along = _transport_coefficients(step.sums.x1x1, step.sums.xx1, step.sums.mx1)
        spread = self.index.spread
        columns = zip(self.slices, spread(keep), spread(along), spread(step.mask), strict=True)
        for j, ((s, group), k, a, mask) in enumerate(columns):
            if step.plan.allowed[self._module_of_slice[j]]:
                x1, buf = self._rows(s, "momentum_buffer")
                self.kernels.momentum_transport(x1, buf, scalar(group["lr"]), k, a, mask)
                s.write_rows(self.optimizer.state[s.param]["momentum_buffer"], buf)


class AdamGRewrite(Rewrite):
    """SGD without momentum as the AdamG it is on the sphere (§4), with per-group virtual radii.

    u_{k+1} = normalize((1−ηλ)u_k + Δ'⊥/r̂_k²), r̂²_{k+1} = (1−ηλ)² r̂_k² + ‖Δ'⊥‖²/r̂_k². A group whose radius is
    not known (NaN: the first step, or after the correction stepped aside) holds its real weights; a step
    then sets r̂ = ‖x_{k+1}‖ and u_{k+1} = x_{k+1}/‖x_{k+1}‖, SGD's own step seen on the sphere.

    A BatchNorm (or InstanceNorm) that keeps running statistics averages what it sees: the outputs of the
    stored weights, 1/r̂ times SGD's. So that eval mode computes what it would under plain SGD, its running
    mean and variance are kept in the same scale, multiplied by r̂_k/r̂_{k+1} and its square whenever the
    radius moves. A module whose norm does that for other channels than its groups (channels moved on the
    way, several norms) takes plain SGD's steps instead.
    """

    shared = ("lr", "weight_decay")

    @property
    def label(self) -> str:
        return "AdamG (SGD rewrite)"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: each group's virtual radius r̂; NaN where the stored weights are the real ones
        self.radius = torch.full((self.index.num_groups,), float("nan"), dtype=torch.float64, device=self.index.device)
        #: the gradients divided by r̂ for :meth:`to_real_gradients`: parameter → the gradient tensor so divided
        self._real: dict[Tensor, Tensor] = {}
        #: whether :meth:`to_real_gradients` was ever asked for, and whether the reminder to was given
        self._converting = self._reminded = False
        self._stepped: set[int] = set()  # modules stepped at least once: they have a radius
        #: (module index, norm) for every norm whose running statistics follow the radius, and for each the
        #: layer's bias outside the groups (zeros if none) with its value when the statistics were last synced
        self._statistics: list[tuple[int, nn.Module]] = []
        self._shifts: list[tuple[Tensor, Tensor]] = []
        unknown = []
        for i, m in enumerate(self.modules):
            norms = self.safeguards.norms(m.entry)
            if norms is None:
                unknown.append(m.entry.module_name)
            elif norms and m.entry.channels_aligned and all(n.num_features == m.entry.num_groups for n in norms):
                self._statistics += [(i, n) for n in norms]
                bias = self.safeguards.shift(m.entry)
                for n in norms:
                    b = n.running_mean.new_zeros(n.num_features) if bias is None else bias.detach()
                    self._shifts.append((b, b.to(n.running_mean.dtype, copy=True)))
            elif norms:
                name = m.entry.module_name
                self._retire(
                    i,
                    "its norm's running statistics do not follow its groups one by one",
                    f"lightning_sphere: {name} takes plain SGD's steps: the AdamG rewrite keeps its weights at unit "
                    f"norm, and the running statistics of {_name_of(norms[0], m)} do not follow the groups of "
                    f"{name} one by one (channels moved or mixed on the way, several norms, or a parametrization "
                    "such as spectral_norm whose common factor moves every channel when one group's norm does), so "
                    "they could not follow (eval mode would compute something else than under plain SGD)",
                )
        if unknown:
            self.safeguards.warn(
                f"lightning_sphere: the AdamG rewrite cannot see the normalization after {', '.join(unknown)} (a "
                "SphereTracker without model=, or a module named in groups=): if it keeps running statistics "
                "(BatchNorm), they average the unit-norm outputs, and eval mode computes something else than "
                "under plain SGD"
            )

    @classmethod
    def decays(cls, group: ParamGroup, rule: OptimizerRule) -> bool:
        return group["weight_decay"] != 0

    def _hand_back(self, plan: Plan) -> Tensor | None:
        """Give the modules torch stepped but the rewrite may not (lr·wd ≥ 1, a partial step, a norm left
        training mode) their real weights: plain SGD's step from r̂ u_k, r̂ (x_{k+1} + η g) − η g / r̂ (the
        gradient at r̂ u_k is g/r̂ by invariance, and in eval mode too, the running statistics being in the
        stored scale), or r̂ u_k where torch did not step. Returns the ``(M,)`` groups given back."""
        back = [
            i
            for i, (allowed, slices) in enumerate(zip(plan.allowed, self._module_slices, strict=True))
            if not allowed and any(plan.active[j] for j in slices)
        ]
        if not back:
            return None
        known = ~self.radius.isnan()
        columns = list(
            zip(self.index.spread(torch.where(known, self.radius, 1)), self.index.spread(known), strict=True)
        )
        handed = torch.zeros_like(known)
        for i in back:
            for j in self._module_slices[i]:
                (s, group), (r, k) = self.slices[j], columns[j]
                x = s.rows(s.param.detach())
                r = r.to(x.dtype)
                if plan.active[j]:
                    g = s.rows(s.param.grad) * group["lr"]
                    real = r * (x + g) - g / r
                else:
                    real = r * x
                x.copy_(torch.where(k, real, x))
                s.write_rows(s.param.detach(), x)
            handed[self.index.groups[i]] = True
        return handed & known

    def rewrite(self, measured: bool) -> StepView:
        plan = self.plan()
        self._remind_to_convert(plan)
        previous = self.radius
        handed = self._hand_back(plan)
        r0 = previous if handed is None else torch.where(handed, float("nan"), previous)
        args = {}
        for j, (s, group) in enumerate(self.slices):
            if plan.allowed[self._module_of_slice[j]]:
                decay = scalar(1 - group["lr"] * group["weight_decay"])
                args[s] = (s.rows(s.param.detach()), s.rows(s.param.grad), scalar(group["lr"]), decay)
        sums = self._sum(plan, lambda s, group: self.kernels.adamg_sums(*args[s]), len(AdamGSums._fields))
        st = AdamGSums(*sums.unbind(1))
        fresh = r0.isnan()
        stopped_before = self._stops.groups
        mask = self.verdict(plan, st, _finite(sums))
        # Newly stopped (invariance lost) with a radius: give them plain SGD's weights, r̂ (x_{k+1} + η g) − η g/r̂.
        back = self._stops.groups & ~stopped_before & ~fresh
        spread = self.index.spread
        columns = [spread(c) for c in (1 / r0.square(), fresh, mask, back, r0)]
        for j, (s, _) in enumerate(self.slices):
            if s in args:
                args[s] = (*args[s], *(c[j] for c in columns[:2]))
        norm = self._sum(plan, lambda s, _: self.kernels.adamg_direction(*args[s], None, None, None, None), 1)
        norm = norm[:, 0].sqrt()  # ‖y‖: the real weights after plain SGD's step are r̂_k y
        for j, ((s, _), row_norm) in enumerate(zip(self.slices, spread(norm), strict=True)):
            if s in args:
                self.kernels.adamg_direction(*args[s], row_norm, columns[2][j], columns[3][j], columns[4][j])
                s.write_rows(s.param.detach(), args[s][0])
        one = torch.ones_like(r0)
        scale0 = torch.where(fresh, one, r0)
        r1 = scale0 * norm  # fresh rows: y = x_{k+1}, the real weights themselves
        # Rewritten: the new radius; stepped and not rewritten: the stored weights are the real ones now.
        self.radius = torch.where(mask, r1, torch.where(plan.stepped, float("nan"), r0))
        handed = back if handed is None else handed | back
        if self._statistics:  # the stored weights' scale went from 1/scale0 (or r̂ given back) to 1/r̂_{k+1}
            factor = torch.where(handed, previous, torch.where(mask, scale0 / r1, one))
            self._rescale_statistics(factor, torch.where(previous.isnan(), one, previous))
        scale0 = torch.where(handed, previous, scale0)
        mask = mask | handed
        scale0 = torch.where(mask | ~plan.stepped, scale0, one)
        return StepView(scale=(scale0, torch.where(self.radius.isnan(), one, self.radius)))

    def view(self, step: StepView) -> StepView:
        return step

    def _rescale_statistics(self, factor: Tensor, old_scale: Tensor) -> None:
        """Keep every synced norm's running statistics those of plain SGD in the stored scale (see
        :meth:`_rescaled_statistics`), in place, and note the layer's bias they are synced with now."""
        means, variances = self._rescaled_statistics(factor, old_scale)
        torch._foreach_copy_([n.running_mean for _, n in self._statistics], means)
        torch._foreach_copy_([n.running_var for _, n in self._statistics], variances)
        torch._foreach_copy_([r for _, r in self._shifts], [b.to(r.dtype) for b, r in self._shifts])

    def _rescaled_statistics(self, factor: Tensor, old_scale: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Every synced norm's running (means, variances) for plain SGD in the stored scale, per group, out of
        place: variance × ``factor``² and mean = b + (plain mean − b)·(stored/real scale), b the layer's bias
        outside the groups. A forward's update keeps that relation; a step that moved b rebases it (× (1 − 1/r̂)
        of the move, ``old_scale`` the r̂ before the step), and the radius moving from r̂ to r̂' rescales it by
        ``factor`` = r̂/r̂' about b. All in a few ``_foreach`` calls."""
        means, variances, factors, coefficients = [], [], [], []
        for i, norm in self._statistics:
            groups = self.index.groups[i]
            means.append(norm.running_mean)
            variances.append(norm.running_var)
            factors.append(factor[groups].to(norm.running_mean.dtype))
            coefficients.append((1 - 1 / old_scale[groups]).to(norm.running_mean.dtype))
        biases = [b.to(m.dtype) for (b, _), m in zip(self._shifts, means, strict=True)]
        synced = [r for _, r in self._shifts]
        variances = torch._foreach_mul(variances, torch._foreach_mul(factors, factors))
        means = torch._foreach_addcmul(means, torch._foreach_sub(biases, synced), coefficients)
        torch._foreach_sub_(means, biases)
        torch._foreach_mul_(means, factors)
        torch._foreach_add_(means, biases)
        return means, variances

    def real_value(self, live: Tensor, value: Tensor) -> Tensor | None:
        """What ``live`` — a parameter this rewrite steps, or a running statistic it keeps in the stored scale —
        holds in plain SGD's model, computed from ``value``, a tensor shaped like it that holds its current
        value (a state dict's entry); ``None`` for any other tensor. Out of place: for checkpoints written while
        the rewrite runs, which must hold the real weights (:meth:`release` does it in place)."""
        known = ~self.radius.isnan()
        for (s, _), r, k in zip(self.slices, self.index.spread(self.radius), self.index.spread(known), strict=True):
            if s.param is live:
                out = value.clone()
                rows = s.rows(out)
                rows.copy_(torch.where(k, rows * r.to(rows.dtype), rows))
                s.write_rows(out, rows)
                return out
        for j, (_, norm) in enumerate(self._statistics):
            if live is norm.running_mean or live is norm.running_var:
                scale = torch.where(known, self.radius, 1)
                means, variances = self._rescaled_statistics(scale, scale)
                return (means if live is norm.running_mean else variances)[j].to(value.dtype, copy=True)
        return None

    def real_tensors(self) -> list[Tensor]:
        """The tensors :meth:`real_value` knows: the stepped parameters and the synced running statistics."""
        norms = [t for _, n in self._statistics for t in (n.running_mean, n.running_var)]
        return [s.param for s, _ in self.slices] + norms

    def to_real_gradients(self) -> None:
        """g ← g/r̂ in the rows whose radius is known: the gradient plain SGD has at the real weights r̂ u, by
        invariance (the stored gradient is r̂ times it). Once until :meth:`restore_gradients`; a gradient that
        is a new tensor since (``zero_grad`` between a step that never came and the next) counts as not
        divided."""
        self._converting = True
        self._scale_gradients(lambda r: 1 / r, divide=True)

    def _remind_to_convert(self, plan: Plan) -> None:
        """Once, at the first step that has radii to convert with (the second one a module is stepped), when
        nothing ever asked for plain SGD's gradients: clipping them unconverted would silently leave plain
        SGD's run. Lightning's monitor always converts; a plain loop must say so."""
        if self._converting or self._reminded:
            return
        now = {i for i, slices in enumerate(self._module_slices) if any(plan.active[j] for j in slices)}
        again, self._stepped = now & self._stepped, self._stepped | now
        if not again:
            return
        self._reminded = True
        names = ", ".join(m.entry.module_name for m in self.modules)
        self.safeguards.warn(
            f"lightning_sphere: the AdamG rewrite keeps {names} at unit norm, so between backward and the step "
            "their gradients are r̂ times plain SGD's: if anything reads or clips them there (clip_grad_norm_, "
            "fabric.clip_gradients), call tracker.to_real_gradients() right before it, which gives it plain SGD's "
            "gradients and silences this (one warning)"
        )

    def restore_gradients(self) -> None:
        """g ← r̂ g in the rows :meth:`to_real_gradients` divided, if the gradients are still those tensors."""
        self._scale_gradients(lambda r: r, divide=False)

    def _scale_gradients(self, factor: Callable[[Tensor], Tensor], divide: bool) -> None:
        known = ~self.radius.isnan()
        columns = self.index.spread(torch.where(known, factor(torch.where(known, self.radius, 1)), 1))
        for (s, _), column in zip(self.slices, columns, strict=True):
            grad = s.param.grad
            if grad is None or (self._real.get(s.param) is grad) != (not divide):
                continue
            rows = s.rows(grad)
            self.kernels.scale_rows(rows, column.to(rows.dtype))
            s.write_rows(grad, rows)
            if divide:
                self._real[s.param] = grad
            else:
                del self._real[s.param]

    def release(self) -> None:
        """Give every module its real weights r̂ u (and its norms their statistics in that scale), forget the
        radii: the model is then plain SGD's, to export, to evaluate or to train on without the rewrite."""
        known = ~self.radius.isnan()
        if self._statistics:
            scale = torch.where(known, self.radius, 1)
            self._rescale_statistics(scale, scale)
        with torch.no_grad():
            for (s, _), r, k in zip(self.slices, self.index.spread(self.radius), self.index.spread(known), strict=True):
                x = s.rows(s.param.detach())
                x.copy_(torch.where(k, x * r.to(x.dtype), x))
                s.write_rows(s.param.detach(), x)
        self.radius = torch.full_like(self.radius, float("nan"))

    def radii(self) -> dict[str, Tensor]:
        return {m.entry.module_name: self.radius[g] for m, g in zip(self.modules, self.index.groups, strict=True)}

    def load_radii(self, radii: dict[str, Tensor]) -> list[str]:
        """Take over radii of the same modules, whose stored weights are the unit-norm ones these radii go with;
        modules without one get theirs on the next step. Returns the modules given one."""
        given = []
        for m, g in zip(self.modules, self.index.groups, strict=True):
            if m.entry.module_name in radii:
                self.radius[g] = radii[m.entry.module_name].to(self.radius)
                given.append(m.entry.module_name)
        return given

    def resume(self, radii: dict[str, Tensor]) -> list[str]:
        """Go on with the rewrite as if it had never stopped, from the real weights r̂ u (and running statistics
        in their scale) that a checkpoint written with these radii holds: store u = x/r̂, and the statistics in
        that scale. Returns the modules resumed."""
        given = self.load_radii(radii)
        known = ~self.radius.isnan()
        with torch.no_grad():
            for (s, _), r, k in zip(self.slices, self.index.spread(self.radius), self.index.spread(known), strict=True):
                x = s.rows(s.param.detach())
                x.copy_(torch.where(k, x / r.to(x.dtype), x))
                s.write_rows(s.param.detach(), x)
            if self._statistics:
                scale = torch.where(known, self.radius, 1)
                self._rescale_statistics(1 / scale, scale)  # the layer's bias has not moved since: no rebase
        return given
