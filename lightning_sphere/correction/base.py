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

**When the correction steps aside** (a module torch did not step, a step that cannot be undone, a zero or
non-finite group, a module that lost its invariance): :mod:`lightning_sphere.correction.safeguards`, whose
:class:`~lightning_sphere.correction.safeguards.Guard` each rewrite owns; the rows it leaves keep the plain
optimizer's bits.

**Adding an algorithm.** Subclass :class:`Rewrite`: name the hyper-parameters a module's param groups must
share (:attr:`Rewrite.shared`), the decay the undo divides out (:meth:`Rewrite.decays`), and implement
:meth:`Rewrite.rewrite` (start with :meth:`Rewrite.plan`, reduce the step with a kernel of
:mod:`lightning_sphere.kernels.rewrites` through :meth:`Rewrite._sum`, let :meth:`Rewrite.verdict` pick the
groups, write them with ``torch.where`` so the others keep torch's bits), and, if the measurement must read
the step differently or the moments wait for it, :meth:`Rewrite.view` and :meth:`Rewrite.transport`. Which
optimizer gets it is the optimizer registry's ``correction`` (:mod:`lightning_sphere.optimizers`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, ClassVar, NamedTuple, Protocol

import torch
from torch import Tensor

from lightning_sphere.core.groups import ParamSlice, Stepped
from lightning_sphere.core.rows import RowIndex
from lightning_sphere.core.sharding import local
from lightning_sphere.correction.safeguards import Guard, Plan, Safeguards
from lightning_sphere.kernels.compiled import Kernels, host_float
from lightning_sphere.kernels.rewrites import AdamGSums, RewriteSums, UpdateSums

#: One param group of a torch optimizer: its hyper-parameters, and its ``params``.
ParamGroup = dict[str, Any]


class Moments(NamedTuple):
    """An adaptive optimizer's a and b after a step (§2), as torch stores them:
    a = ``exp_avg`` · ``inv_bias1`` and b = √``exp_avg_sq`` · ``inv_sqrt_bias2`` + ε, ε the group's ``eps`` unless
    ``eps`` gives the one in force (Prodigy's d·ε).

    The bias corrections are 0-dim float64 tensors where the step count lives (no host sync), or floats.
    """

    exp_avg: Tensor
    exp_avg_sq: Tensor
    inv_bias1: Tensor | float
    inv_sqrt_bias2: Tensor | float
    eps: Tensor | float | None = None


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

    @property
    def weight_decay(self) -> Callable[[ParamGroup], Any]: ...

    def equilibrium(self, group: ParamGroup) -> float | None: ...

    def in_force(self, before: ParamGroup, after: ParamGroup) -> ParamGroup: ...

    @property
    def decay_momentum(self) -> Callable[[ParamGroup], tuple[float, float, bool]] | None: ...


class StepView(NamedTuple):
    """How the measurement must read a corrected step (docs/theory.md §3 with the corrected update), per group.

    Attributes:
        b: AdamS's per-group denominator √v̂_G + ε ``(M,)``, replacing Adam's element-wise b; NaN for the
            groups the step left to Adam.
        scale: per-group factors (σ_k, σ_{k+1}), each ``(M,)``, mapping the stored weights to the virtual
            ones of the AdamG rewrite, x̃ = σ x (so ``norm`` and ``effective_lr`` report the virtual radius).
        target: the angular update the step was made to take, radians ``(M,)`` (the rotational and hyperball
            modes, §9), logged as ``angular_update_equilibrium`` in place of §7's value; the update length the
            optimizer predicts (``update_scale``) does not describe such a step and is not logged.
    """

    b: Tensor | None = None
    scale: tuple[Tensor, Tensor] | None = None
    target: Tensor | None = None


class Rewrite:
    """One correction algorithm, applied after each step of one optimizer to the modules it fits.

    The per-row kernels run once per parameter; everything per group (means, inner products,
    coefficients, which groups to rewrite) runs once for all the modules together.

    Args:
        modules: the modules to rewrite, with their param groups.
        index: their rows and groups, in the same order.
        optimizer: the optimizer whose steps they are.
        mode: ``"srt"``, ``"s"`` or ``"rt"``; a :class:`~lightning_sphere.Rotational` or
            :class:`~lightning_sphere.Hyperball` for the algorithms of :mod:`~lightning_sphere.correction.steering`.
        kernels: the per-row kernels to run.
        rule: the optimizer's registry entry.
        safeguards: when to step aside (see :mod:`~lightning_sphere.correction.safeguards`).
    """

    #: Hyper-parameters all param groups of one module must share for the algorithm to apply.
    shared: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        modules: Sequence[Stepped],
        index: RowIndex,
        optimizer: torch.optim.Optimizer,
        mode: Any,
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
        #: where the rewrite steps aside: :meth:`plan`, :meth:`verdict`, and what stopped for good
        self.guard = Guard(
            self.modules,
            index,
            self.slices,
            self._module_slices,
            safeguards,
            rule.name,
            partial(self.cannot_invert, rule=rule),
        )

    @property
    def label(self) -> str:
        """The algorithm the modules now follow, for the summary."""
        raise NotImplementedError

    @property
    def notes(self) -> dict[str, str]:
        """Module name → where the correction steps aside for good, for the summary."""
        return self.guard.notes

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

    def before_step(self) -> None:
        """Right before the optimizer's step (its pre-hook), for the algorithms that need x_k as it was."""

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

    # ---------------------------------------------------------------- stepping aside (the guard's)

    def plan(self) -> Plan:
        """Which modules torch stepped and which the rewrite may touch
        (:meth:`~lightning_sphere.correction.safeguards.Guard.plan`)."""
        return self.guard.plan()

    def verdict(self, plan: Plan, sums: RewriteSums | AdamGSums | UpdateSums, finite: Tensor) -> Tensor:
        """``(M,)`` bool: the groups this step rewrites, on the device
        (:meth:`~lightning_sphere.correction.safeguards.Guard.verdict`)."""
        return self.guard.verdict(plan, sums, finite)

    def stopped(self) -> tuple[Tensor, Tensor]:
        """The device-side stops, for the tracker's next report
        (:meth:`~lightning_sphere.correction.safeguards.Guard.stopped`)."""
        return self.guard.stopped()

    def report(self, stopped: Tensor, worst: Tensor) -> None:
        """Announce, once per module, what :meth:`verdict` stopped; ``stopped``, ``worst`` on the host
        (:meth:`~lightning_sphere.correction.safeguards.Guard.report`)."""
        self.guard.report(stopped, worst)

    # ---------------------------------------------------------------- per-row work

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


def _finite(sums: Tensor) -> Tensor:
    """``(M,)``: every column of a group's sums is finite."""
    return sums.isfinite().all(1)


def _transport_coefficients(x1x1: Tensor, xx1: Tensor, mx1: Tensor) -> tuple[Tensor, Tensor]:
    """keep, along with m ← keep·m − along·x_k = (⟨x_k, x_{k+1}⟩ m − ⟨m, x_{k+1}⟩ x_k) / ‖x_{k+1}‖²: with R,
    (r_k/r_{k+1}) Γ(m), Γ the transport to u_{k+1}. A zero x_{k+1} has no tangent space: its moments stay."""
    alive = x1x1 > 0
    inv = torch.where(alive, 1 / x1x1, 0)
    return torch.where(alive, xx1 * inv, 1), mx1 * inv
