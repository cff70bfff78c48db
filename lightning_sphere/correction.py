"""Spherical corrections: rewrite each optimizer step on the tracked groups into its spherical form.

Applied right after a real optimizer step (its post-hook), on the tracked groups only, one algorithm
class per kind of optimizer (which one applies is the optimizer registry's call,
:mod:`lightning_sphere.schemes`):

- :class:`AdamRewrite`, Adam and AdamW (THEORY.md §5–§6): **S** replaces each group's element-wise second
  moment by its group mean (AdamS: the mean of an EMA is the EMA of the mean, so torch's own ``exp_avg_sq``
  keeps serving); **R** rescales the moments by r_k/r_{k+1} (second moment by its square) and **T** moves
  the momentum into the new tangent space. Modes ``"srt"`` (AdamSRT), ``"s"`` (AdamS), ``"rt"``.
- :class:`MomentumRewrite`, SGD with momentum: **R** and **T** on the momentum buffer (SGDMRT).
- :class:`AdamGRewrite`, SGD without momentum: the exact AdamG rewrite of §4. The weights stay at unit
  norm and the norm SGD would have had lives on as a per-group *virtual radius* r̂; the trajectory of
  directions and the losses are plain SGD's.

Each step has two phases with explicit state between them: :meth:`Rewrite.rewrite` (weights) returns a
step record, which :meth:`Rewrite.view` turns into what the measurement must know and
:meth:`Rewrite.transport` (moments) consumes. The step already taken is undone from the optimizer's own
quantities (x_k = x_{k+1} + η·step), so no copy of the weights is kept; moment rescaling and transport act
on the optimizer's state tensors in place, so that its checkpoint carries them. Everything runs on the
device with no host sync, in the fused per-row kernels of :mod:`lightning_sphere.kernels`, with the
per-group arithmetic batched over all the modules of a rewrite.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from lightning_sphere.groups import ParamSlice, RowIndex, Stepped
from lightning_sphere.kernels import AdamGSums, DirectionSums, Kernels, MomentumSums, RewriteSums, scalar

if TYPE_CHECKING:
    from lightning_sphere.schemes import OptimizerRule


class StepView(NamedTuple):
    """How the measurement must read a corrected step (THEORY.md §3 with the corrected update), per group.

    Attributes:
        b: AdamS's per-group denominator √v̂_G + ε ``(M,)``, replacing Adam's element-wise b.
        scale: per-group factors (σ_k, σ_{k+1}), each ``(M,)``, mapping the stored weights to the virtual
            ones of the AdamG rewrite, x̃ = σ x (so ``norm`` and ``effective_lr`` report the virtual radius).
    """

    b: Tensor | None = None
    scale: tuple[Tensor, Tensor] | None = None


class Rewrite:
    """One correction algorithm, applied after each step of one optimizer to the modules it fits.

    The per-row kernels run once per parameter; everything per group (means, inner products,
    coefficients) runs once for all the modules together.

    Args:
        modules: the modules to rewrite, with their param groups.
        index: their rows and groups, in the same order.
        optimizer: the optimizer whose steps they are.
        mode: ``"srt"``, ``"s"`` or ``"rt"``.
        kernels: the per-row kernels to run.
        rule: the optimizer's registry entry.
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
    ) -> None:
        if [m.entry for m in modules] != list(index.entries):
            raise ValueError("the row index must list the modules in their order")
        self.modules, self.index = tuple(modules), index
        self.optimizer, self.mode, self.kernels, self.rule = optimizer, mode, kernels, rule
        #: ``(ParamSlice, param group)`` for every slice, in the index's order
        self.slices = [
            (s, group) for m in self.modules for s, group in zip(m.entry.slices, m.param_groups, strict=True)
        ]

    @property
    def label(self) -> str:
        """The algorithm the modules now follow, for the summary."""
        raise NotImplementedError

    @classmethod
    def check(cls, module: Stepped) -> str | None:
        """Why ``module`` cannot be corrected, if its param groups differ in :attr:`shared` hyper-parameters."""
        if len({tuple(repr(g.get(k)) for k in cls.shared) for g in module.param_groups}) > 1:
            return (
                f"{module.entry.module_name}: its parameters sit in param groups with different {', '.join(cls.shared)}"
            )
        return None

    def rewrite(self) -> Any:
        """Turn the step just taken into the corrected one, in place; return what the later phases need."""
        raise NotImplementedError

    def view(self, step: Any) -> StepView:
        """How to measure the corrected step, from :meth:`rewrite`'s record."""
        return StepView()

    def transport(self, step: Any) -> None:
        """R and T on the optimizer's moments, in place, from :meth:`rewrite`'s record (§6)."""

    def radii(self) -> dict[str, Tensor]:
        """Module name → its groups' virtual radii, for the algorithms that keep them."""
        return {}

    def load_radii(self, radii: dict[str, Tensor]) -> None:
        """Restore what :meth:`radii` saved."""

    def _rows(self, s: ParamSlice, *state: str) -> list[Tensor]:
        """Row views of a parameter and of its named optimizer state tensors."""
        return [s.rows(s.param.detach()), *(s.rows(self.optimizer.state[s.param][name]) for name in state)]


def _transport_coefficients(x1x1: Tensor, xx1: Tensor, mx1: Tensor) -> tuple[Tensor, Tensor]:
    """keep, along with m ← keep·m − along·x_k = (⟨x_k, x_{k+1}⟩ m − ⟨m, x_{k+1}⟩ x_k) / ‖x_{k+1}‖²: with R,
    (r_k/r_{k+1}) Γ(m), Γ the transport to u_{k+1}. A zero x_{k+1} has no tangent space: its moments stay."""
    alive = x1x1 > 0
    inv = torch.where(alive, 1 / x1x1, 0)
    return torch.where(alive, xx1 * inv, 1), mx1 * inv


class AdamStep(NamedTuple):
    """What :class:`AdamRewrite` carries from the rewrite to the transport."""

    sums: RewriteSums  # per group, after the rewrite
    root: Tensor | None  # AdamS: √v̂_G per group, the group denominator less ε


class AdamRewrite(Rewrite):
    """AdamS, AdamSRT or Adam + R + T on Adam and AdamW (§5–§6)."""

    shared = ("betas", "eps")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._group_size = self.index.per_module([m.entry.group_size for m in self.modules], torch.float32)

    @property
    def label(self) -> str:
        return {"srt": "AdamSRT", "s": "AdamS", "rt": "Adam+RT"}[self.mode]

    def rewrite(self) -> AdamStep:
        root = self._group_root() if "s" in self.mode else None
        args = self._args(root)
        sums = self.index.sum_rows([self.kernels.adam_rewrite(*a) for a in args])
        for (s, _), a in zip(self.slices, args, strict=True):
            s.write_rows(s.param.detach(), a[0])
        return AdamStep(RewriteSums(*sums.unbind(1)), root)

    def view(self, step: AdamStep) -> StepView:
        if step.root is None:
            return StepView()
        return StepView(b=step.root + self.index.per_module([m.param_groups[0]["eps"] for m in self.modules]))

    def transport(self, step: AdamStep) -> None:
        if self.mode == "s":
            return
        s = step.sums
        keep, along = _transport_coefficients(s.x1x1, s.xx1, s.mx1)
        ratio = torch.where(s.x1x1 > 0, s.xx / s.x1x1, 1)  # (r_k/r_{k+1})²
        columns = zip(*(self.index.spread(c) for c in (keep, along, ratio)), strict=True)
        for args, (p, _), (k, a, r) in zip(self._args(step.root), self.slices, columns, strict=True):
            self.kernels.adam_transport(*args, k, a, r)
            state = self.optimizer.state[p.param]
            p.write_rows(state["exp_avg"], args[1])
            p.write_rows(state["exp_avg_sq"], args[2])

    def _group_root(self) -> Tensor:
        """√v̂_G, v_G the group mean of the bias-corrected second moment (§6)."""
        per_row = []
        for s, group in self.slices:
            moments = self.rule.moments(self.optimizer.state[s.param], group)
            per_row.append(s.rows(moments.exp_avg_sq).sum(1, keepdim=True) * moments.inv_sqrt_bias2.square())
        return (self.index.sum_rows(per_row)[:, 0] / self._group_size).sqrt()

    def _args(self, root: Tensor | None) -> list[tuple[Any, ...]]:
        """Per slice: x_{k+1}, m, v rows, AdamS's b per row, and the scalars of the step torch took."""
        roots = self.index.spread(root) if root is not None else [None] * len(self.slices)
        out = []
        for (s, group), r in zip(self.slices, roots, strict=True):
            x1, m, v = self._rows(s, "exp_avg", "exp_avg_sq")
            moments = self.rule.moments(self.optimizer.state[s.param], group)
            b = None if r is None else r + group["eps"]
            lr, eps, decay_factor = scalar(group["lr"]), scalar(group["eps"]), scalar(self.rule.decay_factor(group))
            out.append((x1, m, v, b, lr, moments.inv_bias1, moments.inv_sqrt_bias2, eps, decay_factor))
        return out


class MomentumRewrite(Rewrite):
    """SGDMRT: R and T on SGD's momentum buffer (§6)."""

    shared = ("momentum", "dampening")

    @property
    def label(self) -> str:
        return "SGDMRT"

    def rewrite(self) -> MomentumSums:
        per_row = [
            self.kernels.momentum_sums(*self._rows(s, "momentum_buffer"), scalar(g["lr"])) for s, g in self.slices
        ]
        return MomentumSums(*self.index.sum_rows(per_row).unbind(1))

    def transport(self, step: MomentumSums) -> None:
        keep, along = _transport_coefficients(step.x1x1, step.xx1, step.mx1)
        for (s, group), k, a in zip(self.slices, self.index.spread(keep), self.index.spread(along), strict=True):
            x1, buf = self._rows(s, "momentum_buffer")
            self.kernels.momentum_transport(x1, buf, scalar(group["lr"]), k, a)
            s.write_rows(self.optimizer.state[s.param]["momentum_buffer"], buf)


class AdamGRewrite(Rewrite):
    """SGD without momentum as the AdamG it is on the sphere (§4), with per-group virtual radii.

    u_{k+1} = normalize((1−ηλ)u_k + Δ'⊥/r̂_k²), r̂²_{k+1} = (1−ηλ)² r̂_k² + ‖Δ'⊥‖²/r̂_k². On the first step
    (radius unknown), which plain SGD took from x_0: r̂ = ‖x_1‖ and u_1 = x_1/‖x_1‖.
    """

    shared = ("lr", "weight_decay")

    @property
    def label(self) -> str:
        return "AdamG (SGD rewrite)"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: each group's virtual radius r̂; NaN where not known yet (set on the first step)
        self.radius = torch.full((self.index.num_groups,), float("nan"), dtype=torch.float64, device=self.index.device)
        self._fresh = True  # a step with unknown radii must still set them
        self._decay_key: tuple[float, ...] | None = None
        self._decay_factor = self.radius

    def rewrite(self) -> StepView:
        per_slice = []
        for s, group in self.slices:
            x1 = s.rows(s.param.detach())
            g = torch.zeros_like(x1) if s.param.grad is None else s.rows(s.param.grad)
            per_slice.append((x1, g, scalar(group["lr"]), scalar(1 - group["lr"] * group["weight_decay"])))
        sums = AdamGSums(*self.index.sum_rows([self.kernels.adamg_sums(*a) for a in per_slice]).unbind(1))
        r0, fresh = self.radius, self.radius.isnan()
        spread = self.index.spread
        fresh_rows = spread(fresh) if self._fresh else [None] * len(per_slice)
        columns = zip(spread(sums.du / sums.uu), spread(1 / r0.square()), fresh_rows, strict=True)
        per_slice = [(*a, *c) for a, c in zip(per_slice, columns, strict=True)]
        direction = self.index.sum_rows([self.kernels.adamg_direction(*a, None) for a in per_slice])
        direction = DirectionSums(*direction.unbind(1))
        for (s, _), a, norm in zip(self.slices, per_slice, spread(direction.yy.sqrt()), strict=True):
            self.kernels.adamg_direction(*a, norm)
            s.write_rows(s.param.detach(), a[0])
        r1 = (self._decay_factors().square() * r0.square() + direction.tt / r0.square()).sqrt()
        r1 = torch.where(fresh, sums.x1x1.sqrt(), r1) if self._fresh else r1
        scale0 = torch.where(fresh, 1.0, r0) if self._fresh else r0
        self.radius, self._fresh = r1, False
        return StepView(scale=(scale0, r1))

    def view(self, step: StepView) -> StepView:
        return step

    def _decay_factors(self) -> Tensor:
        """1 − ηλ of every group, on the device; copied there again only when a learning rate changed."""
        values = tuple(1 - m.param_groups[0]["lr"] * m.param_groups[0]["weight_decay"] for m in self.modules)
        if self._decay_key != values:
            self._decay_key, self._decay_factor = values, self.index.per_module(values)
        return self._decay_factor

    def radii(self) -> dict[str, Tensor]:
        if self._fresh:
            return {}
        return {m.entry.module_name: self.radius[g] for m, g in zip(self.modules, self.index.groups, strict=True)}

    def load_radii(self, radii: dict[str, Tensor]) -> None:
        """Restore saved radii; modules without one get theirs on the next step."""
        for m, g in zip(self.modules, self.index.groups, strict=True):
            if m.entry.module_name in radii:
                self.radius[g] = radii[m.entry.module_name].to(self.radius)
        self._fresh = any(m.entry.module_name not in radii for m in self.modules)
