"""Any optimizer's update put on the sphere, on the detected groups: the algorithms of the rotational and hyperball
modes (docs/theory.md §9; their options are :mod:`~lightning_sphere.correction.steering_options`').

The §4–§6 rewrites read one optimizer's own quantities to undo its step; these two work for any optimizer, so
they copy x_k before the step (:meth:`SteeredRewrite.before_step`) and read the base optimizer's update off the
step it took: Δ = (1 − ηλ) x_k − x_{k+1} = η u, the step less a decoupled decay (§9). Each step costs one copy
of the tracked weights and two passes over their rows: one for the per-group sums (:func:`update_sums`), one to
write the new weights (:func:`rotational_write`, :func:`hyperball_write`); everything per group is batched over
all the modules on the device, with no host sync.

**State.** Each group's radius R (and, for the rotational mode, the running mean of ‖u_⊥‖² and β^t) lives in
the optimizer's state of the module's first parameter, under ``"sphere_<mode>:<module name>"``, an ``(N, k)``
tensor in the parameter's dtype: every checkpoint of the optimizer carries it, and a ``load_state_dict`` round
trip gives it back bit for bit (torch casts loaded state to the parameter's dtype, so it is stored in that dtype
to begin with). It is written once the base optimizer has stepped the parameter (an optimizer that initializes
its state when ``len(state) == 0`` finds its own keys first).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from lightning_sphere.core.groups import ParamSlice
from lightning_sphere.core.rows import math_dtype
from lightning_sphere.core.sharding import local
from lightning_sphere.correction.base import ParamGroup, Rewrite, StepView, _finite
from lightning_sphere.correction.decay_momentum import CoupledDecay
from lightning_sphere.correction.safeguards import Plan
from lightning_sphere.correction.steering_options import Hyperball, Rotational, Steering, rotational_target
from lightning_sphere.kernels.compiled import host_float, scalar
from lightning_sphere.kernels.rewrites import UpdateSums

#: The angle (radians) from which centering a group is announced.
CENTERING_NOTE = 0.01


class SteeredStep(NamedTuple):
    """What a steered rewrite tells the measurement: the angular update it aims at, per group."""

    target: Tensor


class SteeredRewrite(Rewrite):
    """The base of :class:`RotationalRewrite` and :class:`HyperballRewrite`: x_k copied before the step, the
    base update read off the step, per-group state in the optimizer's state (see the module docstring)."""

    #: A module's param groups must agree on these: a group's update is read with one η and one decay.
    shared = ("lr", "weight_decay", "momentum", "dampening", "nesterov", "betas")
    #: Columns of the per-group state.
    columns: ClassVar[tuple[str, ...]] = ("radius",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.options: Steering = self.mode
        device = self.index.device
        #: the dtype of the per-group arithmetic
        self._dtype = torch.float32 if device.type == "mps" else torch.float64
        self._group_size = self.index.per_module([m.entry.group_size for m in self.modules], self._dtype)
        dtypes = {m.entry.params[0].dtype for m in self.modules}
        #: (M, k) per-group state, in the parameters' dtype; each module's rows, a view, sit in the optimizer's state
        self.state = torch.zeros(
            self.index.num_groups,
            len(self.columns),
            dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32,
            device=device,
        )
        self._init_state()
        self._keys = [f"sphere_{self.options.name}:{m.entry.module_name}" for m in self.modules]
        self._views: list[Tensor | None] = [None] * len(self.modules)
        self._module_by_slice = {id(s): self._module_of_slice[j] for j, (s, _) in enumerate(self.slices)}
        self._x0: dict[Tensor, Tensor] | None = None
        self._buffers: list[Tensor] = []
        self._before: dict[int, dict[str, Any]] = {}
        self._cache: dict[str, tuple[tuple[Any, ...], Tensor]] = {}
        self._pending: Tensor | None = None
        self._grads: dict[Tensor, Tensor | None] | None = None
        self._decay = CoupledDecay(self.rule, self.optimizer, self.modules)
        self._announce_zero_groups()

    def _announce_zero_groups(self) -> None:
        """Say once, at construction (one transfer), which modules have groups still at zero (they take the base
        optimizer's steps until they have a norm, which then becomes their radius), and, when centering, how far
        centering turns each module's groups at their first step."""
        with torch.no_grad():
            rows = [s.rows(s.param.detach()).double() for s, _ in self.slices]
            per_row = [torch.stack([r.square().sum(1), r.sum(1)], 1) for r in rows]
            sums = self.index.sum_rows(per_row).cpu() if rows else torch.zeros(0, 2, dtype=torch.float64)
        size = self._group_size.cpu()
        squares, totals = sums.unbind(1)
        centering = (totals.square() / size / squares.clamp(min=1e-300)).clamp(max=1).sqrt().asin()
        center = isinstance(self.options, Rotational) and self.options.center
        turned: dict[str, float] = {}
        for m, groups in zip(self.modules, self.index.groups, strict=True):
            count = int((squares[groups] == 0).sum())
            if count:
                self.safeguards.warn(
                    f"lightning_sphere: {m.entry.module_name} has {count} of {m.entry.num_groups} groups at zero: "
                    f"the {self.options.name} correction leaves them to {self.rule.name} until they have a norm, "
                    "which then becomes their radius"
                )
            angle = float(centering[groups][squares[groups] > 0].max()) if count < m.entry.num_groups else 0.0
            if center and angle > CENTERING_NOTE:
                turned[m.entry.module_name] = angle
        if turned:
            most = max(turned, key=turned.__getitem__)
            self.safeguards.warn(
                f"lightning_sphere: centering (Rotational(center=True), Kosson et al.'s default) turns the groups of "
                f"{len(turned)} of {len(self.modules)} modules by more than {CENTERING_NOTE} rad at their first "
                f"step, up to {turned[most]:.2g} rad ({most}): their mean is taken out and their norm kept, which "
                "changes a layer's output unless its input is centered; Rotational(center=False) keeps the weights "
                "as they are"
            )

    def _init_state(self) -> None:
        """The state of a group never corrected: radius 0 (unknown)."""

    @property
    def label(self) -> str:
        return f"{self.options.name} {self.rule.name}"

    # ---------------------------------------------------------------- before the step

    def before_step(self) -> None:
        """Copy x_k of the rewrite's parameters (this rank's shards), and the param groups as they are."""
        params = [local(s.param) for s, _ in self.slices]
        if len(self._buffers) != len(params) or any(
            b.shape != p.shape or b.dtype != p.dtype or b.device != p.device
            for b, p in zip(self._buffers, params, strict=True)
        ):
            self._buffers = [torch.empty_like(p) for p in params]
        with torch.no_grad():
            torch._foreach_copy_(self._buffers, params)
        self._x0 = {s.param: b for (s, _), b in zip(self.slices, self._buffers, strict=True)}
        self._before = {id(g): {k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups}
        self._decay.before_step()

    def restore_gradients(self) -> None:
        """The gradients are the ones the update will consume: hold them, since an optimizer may drop them in its
        step (heavyball sets ``p.grad`` to ``None``), which would read as a module it did not step."""
        self._grads = {s.param: s.param.grad for s, _ in self.slices}

    # ---------------------------------------------------------------- the step

    def rewrite(self, measured: bool) -> SteeredStep | None:
        x0, self._x0 = self._x0, None
        if x0 is None:  # the step began before this rewrite existed: it stays the plain optimizer's
            return None
        self._restore_state()
        grads, self._grads = self._grads or {s.param: s.param.grad for s, _ in self.slices}, None
        plan = self.guard.plan(grads)
        groups = [self.rule_group(m.param_groups[0]) for m in self.modules]
        decay = [scalar(self.rule.decay_factor(g)) for g in groups]
        held, coefficients = self._decay(plan, groups, x0)

        def per_slice(s: ParamSlice, group: ParamGroup) -> Tensor:
            grad = grads[s.param]
            assert grad is not None  # an allowed module's slices all have one (Guard.plan)
            dtype = math_dtype(s.param)
            x, x1, g = (s.rows(t).to(dtype) for t in (x0[s.param], s.param.detach(), grad))
            i = self._module_by_slice[id(s)]
            h = s.rows(held[s.param]).to(dtype) if s.param in held else x
            return self.kernels.update_sums(x, x1, g, decay[i], h, *coefficients[i])

        sums = UpdateSums(*self._sum(plan, per_slice, len(UpdateSums._fields)).to(self._dtype).unbind(1))
        step, scale, target, extra, ok = self.coefficients(sums, groups)
        finite = _finite(torch.stack(list(sums), 1)) & ok & scale.isfinite() & step.isfinite()
        mask = self.verdict(plan, sums, finite)
        spread = self.index.spread
        columns = zip(self.slices, spread(step), spread(scale), spread(mask), *(spread(c) for c in extra), strict=True)
        for j, ((s, _), *per_row) in enumerate(columns):
            i = self._module_of_slice[j]
            if plan.allowed[i]:
                dtype = math_dtype(s.param)
                x, x1 = s.rows(x0[s.param]).to(dtype), s.rows(s.param.detach())
                work = x1.to(dtype)
                step_row, scale_row, mask_row, *more = (c if c.dtype == torch.bool else c.to(dtype) for c in per_row)
                h = s.rows(held[s.param]).to(dtype) if s.param in held else x
                self.write(x, work, decay[i], step_row, scale_row, mask_row, [h, *coefficients[i], *more])
                s.write_rows(s.param.detach(), work)
        assert self._pending is not None  # set by coefficients()
        self.state.copy_(torch.where(mask[:, None], self._pending.to(self.state.dtype), self.state))
        self._store_state(plan)
        return SteeredStep(target)

    def view(self, step: Any) -> StepView:
        if step is None:  # a plain step: no target
            return StepView(target=torch.full((self.index.num_groups,), float("nan"), device=self.index.device))
        return StepView(target=step.target)

    def rule_group(self, group: ParamGroup) -> ParamGroup:
        """The param group as the step used it (the learning rate in force: Prodigy's d·lr)."""
        return self.rule.in_force(self._before.get(id(group), group), group)

    def coefficients(
        self, sums: UpdateSums, groups: list[ParamGroup]
    ) -> tuple[Tensor, Tensor, Tensor, list[Tensor], Tensor]:
        """Per group: the write's ``step`` and ``scale``, the target angular update, further columns for
        :meth:`write`, and which groups may be written; sets ``_pending``, the state after this step for the
        groups it writes."""
        raise NotImplementedError

    def write(
        self, x0: Tensor, x1: Tensor, decay: Tensor, step: Tensor, scale: Tensor, mask: Tensor, extra: list[Tensor]
    ) -> None:
        """Write the step into the rows ``x1`` (from x_k's rows ``x0``), with :meth:`coefficients`' columns."""
        raise NotImplementedError

    # ---------------------------------------------------------------- per-group values from the host

    def per_group(self, name: str, values: Sequence[Any]) -> Tensor:
        """One value per module as ``(M,)`` on the device, uploaded only when the values change (a learning rate
        held constant costs no copy; a scheduled one, one small non-blocking copy per step). A value held in a
        tensor on the host is read; ``None`` becomes NaN."""
        key = tuple(values)
        cached = self._cache.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        floats = [float("nan") if v is None else float(v) for v in values]
        host = torch.tensor(floats, dtype=self._dtype)
        if self.index.device.type == "cuda":
            host = host.pin_memory()
        tensor = host.to(self.index.device, non_blocking=True)[self.index.module_of_group]
        self._cache[name] = (key, tensor)
        return tensor

    # ---------------------------------------------------------------- state in the optimizer's state

    def _restore_state(self) -> None:
        """Take back each module's state from the optimizer's where it is not our view any more (a
        ``load_state_dict`` replaced it)."""
        for i, m in enumerate(self.modules):
            stored = self.optimizer.state.get(m.entry.params[0], {}).get(self._keys[i])
            if stored is not None and stored is not self._views[i]:
                part = self.state[self.index.groups[i]]
                if tuple(stored.shape) != tuple(part.shape):
                    raise ValueError(
                        f"the optimizer state's {self._keys[i]!r} has shape {tuple(stored.shape)}, but "
                        f"{m.entry.module_name} has {len(part)} groups: a checkpoint of another model?"
                    )
                part.copy_(stored.to(part))
                self._views[i] = None

    def _store_state(self, plan: Plan) -> None:
        """Put each stepped module's state into the optimizer's state, once: a view of :attr:`state`, which the
        steps update in place."""
        for i, m in enumerate(self.modules):
            if plan.allowed[i] and self._views[i] is None:
                view = self.state[self.index.groups[i]]
                self.optimizer.state[m.entry.params[0]][self._keys[i]] = view
                self._views[i] = view

    def _stored(self, radius: Tensor) -> Tensor:
        """A new radius as the state will hold it (16-bit weights: rounded), so that the first step already lands on
        the radius every later one holds."""
        return radius.to(self.state.dtype).to(radius.dtype)

    def radius_values(self) -> dict[str, Tensor]:
        """Module name → its groups' radii (0 where not known yet), for tests and reports."""
        return {m.entry.module_name: self.state[self.index.groups[i], 0] for i, m in enumerate(self.modules)}


class RotationalRewrite(SteeredRewrite):
    """Kosson et al.'s rotational variant of any registered optimizer (§9.1)."""

    columns = ("radius", "update_mean_square", "decay_power")

    def _init_state(self) -> None:
        self.state[:, 2] = 1.0  # β^0

    def coefficients(
        self, sums: UpdateSums, groups: list[ParamGroup]
    ) -> tuple[Tensor, Tensor, Tensor, list[Tensor], Tensor]:
        options = self.options
        assert isinstance(options, Rotational)
        beta, n = options.update_norm_decay, self._group_size
        eta = self.per_group("lr", [host_float(g["lr"]) for g in groups])
        target = self.per_group("target", [rotational_target(options, g, self.rule) for g in groups])
        inv_lr = torch.where(eta > 0, 1 / eta, 0)
        xu, uu, su = sums.xd * inv_lr, sums.dd * inv_lr.square(), sums.sd * inv_lr
        radius, mean_sq, power = self.state.unbind(1)
        first = radius == 0
        radius = torch.where(first, self._stored(sums.xx.sqrt()), radius)
        if options.center:
            mean_u, centered_sq = su / n, sums.xx - sums.sx.square() / n
            mean_x = torch.where(first & (centered_sq > 0), sums.sx / n, 0)
            kx = torch.where(first & (centered_sq > 0), radius / centered_sq.clamp(min=1e-300).sqrt(), 1)
        else:
            mean_u = mean_x = torch.zeros_like(radius)
            kx = torch.ones_like(radius)
        xx = kx.square() * (sums.xx - 2 * mean_x * sums.sx + n * mean_x.square())
        xu = kx * (xu - mean_x * su - mean_u * sums.sx + n * mean_u * mean_x)
        uu = uu - 2 * mean_u * su + n * mean_u.square()
        along = xu / radius.square()
        tangent_sq = (uu - 2 * along * xu + along.square() * xx).clamp(min=0)
        mean_sq = (1 - beta) * tangent_sq / n + beta * mean_sq  # kept per entry: no overflow in 16-bit state
        power = power * beta
        average = (mean_sq * n / (1 - power)).sqrt()
        step = target * radius / (average + options.eps)
        moved_sq = xx - 2 * step * (xu - along * xx) + step.square() * tangent_sq
        scale = radius / moved_sq.sqrt()
        self._pending = torch.stack([radius, mean_sq, power], 1)
        ok = (target > 0) & (eta > 0) & (radius > 0) & (moved_sq > 0)
        return step, scale, target, [inv_lr, mean_x, kx, mean_u, along], ok

    def write(
        self, x0: Tensor, x1: Tensor, decay: Tensor, step: Tensor, scale: Tensor, mask: Tensor, extra: list[Tensor]
    ) -> None:
        held, a, b, inv_lr, mean_x, kx, mean_u, along = extra
        self.kernels.rotational_write(x0, x1, decay, held, a, b, inv_lr, mean_x, kx, mean_u, along, step, scale, mask)


class HyperballRewrite(SteeredRewrite):
    """The hyperball form of any registered optimizer (§9.2)."""

    def coefficients(
        self, sums: UpdateSums, groups: list[ParamGroup]
    ) -> tuple[Tensor, Tensor, Tensor, list[Tensor], Tensor]:
        options = self.options
        assert isinstance(options, Hyperball)
        eta = self.per_group("lr", [host_float(g["lr"]) for g in groups])
        radius = self.state[:, 0]
        first = radius == 0
        start = sums.xx.sqrt() if options.radius is None else torch.full_like(radius, options.radius)
        radius = torch.where(first & (sums.xx > 0), self._stored(start), radius)
        length = sums.dd.sqrt()
        step = torch.where(length > 0, eta * radius / length, 0)
        moved_sq = sums.xx - 2 * step * sums.xd + step.square() * sums.dd
        scale = radius / moved_sq.sqrt()
        self._pending = radius[:, None]
        ok = (radius > 0) & (moved_sq > 0) & (eta >= 0)
        return step, scale, torch.atan(eta), [], ok

    def write(
        self, x0: Tensor, x1: Tensor, decay: Tensor, step: Tensor, scale: Tensor, mask: Tensor, extra: list[Tensor]
    ) -> None:
        self.kernels.hyperball_write(x0, x1, decay, step, scale, mask)
