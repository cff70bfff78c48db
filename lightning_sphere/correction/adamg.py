"""SGD without momentum as the AdamG it is on the sphere, with per-group virtual radii (docs/theory.md §4.3)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_sphere.core.groups import ParamSlice
from lightning_sphere.correction.base import ParamGroup, Rewrite, Scheme, StepView, _finite
from lightning_sphere.correction.safeguards import Plan, _name_of
from lightning_sphere.correction.statistics import RunningStatistics
from lightning_sphere.kernels.compiled import scalar
from lightning_sphere.kernels.rewrites import AdamGSums


class AdamGRewrite(Rewrite):
    """SGD without momentum as the AdamG it is on the sphere (§4), with per-group virtual radii.

    u_{k+1} = normalize((1−ηλ)u_k + Δ'⊥/r̂_k²), r̂²_{k+1} = (1−ηλ)² r̂_k² + ‖Δ'⊥‖²/r̂_k². A group whose radius is
    not known (NaN: the first step, or after the correction stepped aside) holds its real weights; a step
    then sets r̂ = ‖x_{k+1}‖ and u_{k+1} = x_{k+1}/‖x_{k+1}‖, SGD's own step seen on the sphere.

    A BatchNorm (or InstanceNorm) that keeps running statistics averages what it sees: the outputs of the
    stored weights, 1/r̂ times SGD's. So that eval mode computes what it would under plain SGD, its running
    mean and variance are kept in the same scale, multiplied by r̂_k/r̂_{k+1} and its square whenever the
    radius moves (:class:`~lightning_sphere.correction.statistics.RunningStatistics`). A module whose norm
    does that for other channels than its groups (channels moved on the way, several norms) takes plain SGD's
    steps instead.
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
        #: the running statistics of the norms after the modules, kept in the stored weights' scale
        self.statistics = RunningStatistics(self.index)
        unknown = []
        for i, m in enumerate(self.modules):
            norms = self.safeguards.norms(m.entry)
            if norms is None:
                unknown.append(m.entry.module_name)
            elif norms and not self.statistics.follow(i, m.entry, norms, self.safeguards.shift):
                name = m.entry.module_name
                self.guard.retire(
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
    def decays(cls, group: ParamGroup, rule: Scheme) -> bool:
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
                    grad = s.param.grad
                    assert grad is not None  # an active slice is one with a gradient (Guard.plan)
                    g = s.rows(grad) * group["lr"]
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
        args: dict[ParamSlice, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        for j, (s, group) in enumerate(self.slices):
            if plan.allowed[self._module_of_slice[j]]:
                grad = s.param.grad
                assert grad is not None  # an allowed module's slices all have one (Guard.plan)
                decay = scalar(1 - group["lr"] * group["weight_decay"])
                args[s] = (s.rows(s.param.detach()), s.rows(grad), scalar(group["lr"]), decay)
        sums = self._sum(plan, lambda s, group: self.kernels.adamg_sums(*args[s]), len(AdamGSums._fields))
        st = AdamGSums(*sums.unbind(1))
        fresh = r0.isnan()
        stopped_before = self.guard.stops.groups
        mask = self.verdict(plan, st, _finite(sums))
        # Newly stopped (invariance lost) with a radius: give them plain SGD's weights, r̂ (x_{k+1} + η g) − η g/r̂.
        back = self.guard.stops.groups & ~stopped_before & ~fresh
        spread = self.index.spread
        columns = [spread(c) for c in (1 / r0.square(), fresh, mask, back, r0)]
        direction = {s: (*args[s], columns[0][j], columns[1][j]) for j, (s, _) in enumerate(self.slices) if s in args}
        norm = self._sum(plan, lambda s, _: self.kernels.adamg_direction(*direction[s], None, None, None, None), 1)
        norm = norm[:, 0].sqrt()  # ‖y‖: the real weights after plain SGD's step are r̂_k y
        for j, ((s, _), row_norm) in enumerate(zip(self.slices, spread(norm), strict=True)):
            if s in direction:
                self.kernels.adamg_direction(*direction[s], row_norm, columns[2][j], columns[3][j], columns[4][j])
                s.write_rows(s.param.detach(), direction[s][0])
        one = torch.ones_like(r0)
        scale0 = torch.where(fresh, one, r0)
        r1 = scale0 * norm  # fresh rows: y = x_{k+1}, the real weights themselves
        # Rewritten: the new radius; stepped and not rewritten: the stored weights are the real ones now.
        self.radius = torch.where(mask, r1, torch.where(plan.stepped, float("nan"), r0))
        handed = back if handed is None else handed | back
        if self.statistics.norms:  # the stored weights' scale went from 1/scale0 (or r̂ given back) to 1/r̂_{k+1}
            factor = torch.where(handed, previous, torch.where(mask, scale0 / r1, one))
            self.statistics.rescale(factor, torch.where(previous.isnan(), one, previous))
        scale0 = torch.where(handed, previous, scale0)
        mask = mask | handed
        scale0 = torch.where(mask | ~plan.stepped, scale0, one)
        return StepView(scale=(scale0, torch.where(self.radius.isnan(), one, self.radius)))

    def view(self, step: StepView) -> StepView:
        return step

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
        return self.statistics.real_value(live, value, self.radius)

    def real_tensors(self) -> list[Tensor]:
        """The tensors :meth:`real_value` knows: the stepped parameters and the synced running statistics."""
        return [s.param for s, _ in self.slices] + self.statistics.tensors()

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
        if self.statistics.norms:
            scale = torch.where(known, self.radius, 1)
            self.statistics.rescale(scale, scale)
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
            if self.statistics.norms:
                scale = torch.where(known, self.radius, 1)
                self.statistics.rescale(1 / scale, scale)  # the layer's bias has not moved since: no rebase
        return given
