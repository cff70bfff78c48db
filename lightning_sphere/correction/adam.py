"""AdamS, AdamSRT and Adam + R + T on torch's Adam and AdamW (docs/theory.md §5–§6)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_sphere.core.groups import ParamSlice
from lightning_sphere.correction.base import (
    Moments,
    ParamGroup,
    Rewrite,
    Scheme,
    StepView,
    _finite,
    _transport_coefficients,
)
from lightning_sphere.correction.safeguards import Plan
from lightning_sphere.kernels.compiled import scalar
from lightning_sphere.kernels.rewrites import RewriteSums


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
    def decays(cls, group: ParamGroup, rule: Scheme) -> bool:
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
        sums = step.sums
        keep = along = ratio = None
        if transport:
            keep, along = _transport_coefficients(sums.x1x1, sums.xx1, sums.mx1)
            ratio = torch.where(sums.x1x1 > 0, sums.xx / sums.x1x1, 1)  # (r_k/r_{k+1})²
        spread = self.index.spread
        columns = [spread(c) if c is not None else [None] * len(self.slices) for c in (keep, along, ratio)]
        for j, ((s, _), mask) in enumerate(zip(self.slices, spread(step.mask), strict=True)):
            if s not in args:
                continue
            x1, m, v, _, b, lr, inv_bias1, inv_sqrt_bias2, eps, decay = args[s]  # the gradient is the sums' only
            self.kernels.adam_apply(
                x1, m, v, b, lr, inv_bias1, inv_sqrt_bias2, eps, decay, mask, rewritten, *(c[j] for c in columns)
            )
            state = self.optimizer.state[s.param]
            s.write_rows(s.param.detach(), x1)
            s.write_rows(state["exp_avg"], m)
            s.write_rows(state["exp_avg_sq"], v)

    def _group_root(self, plan: Plan) -> Tensor:
        """√v̂_G, v_G the group mean of the bias-corrected second moment (§6)."""

        read = self._read_moments()

        def per_slice(s: ParamSlice, group: ParamGroup) -> Tensor:
            moments = read(self.optimizer.state[s.param], group)
            assert moments is not None  # an allowed slice had a gradient: torch's Adam stepped it, it has moments
            return s.rows(moments.exp_avg_sq).sum(1, keepdim=True) * scalar(moments.inv_sqrt_bias2).square()

        return (self._sum(plan, per_slice, 1)[:, 0] / self._group_size).sqrt()

    def _args(self, plan: Plan, root: Tensor | None) -> dict[ParamSlice, tuple[Any, ...]]:
        """Per slice of an allowed module: x_{k+1}, m, v, g rows, AdamS's b per row, and the scalars of the
        step torch took."""
        roots = self.index.spread(root) if root is not None else [None] * len(self.slices)
        read = self._read_moments()
        out = {}
        for j, ((s, group), r) in enumerate(zip(self.slices, roots, strict=True)):
            if not plan.allowed[self._module_of_slice[j]]:
                continue
            x1, m, v = self._rows(s, "exp_avg", "exp_avg_sq")
            moments = read(self.optimizer.state[s.param], group)
            assert moments is not None  # an allowed slice had a gradient: torch's Adam stepped it, it has moments
            b = None if r is None else r + group["eps"]
            lr, eps, decay_factor = scalar(group["lr"]), scalar(group["eps"]), scalar(self.rule.decay_factor(group))
            grad = s.param.grad
            assert grad is not None  # an allowed module's slices all have one (Guard.plan)
            g = s.rows(grad)
            out[s] = (x1, m, v, g, b, lr, moments.inv_bias1, moments.inv_sqrt_bias2, eps, decay_factor)
        return out

    def _read_moments(self) -> Callable[[dict[str, Any], ParamGroup], Moments | None]:
        """The rule's reader of a parameter's moments: the registry gives this rewrite only to optimizers
        that have them."""
        read = self.rule.moments
        assert read is not None, f"{self.rule.name} has no moments for the Adam rewrite to read"
        return read


def _finite_root(root: Tensor | None) -> Tensor | bool:
    return True if root is None else root.isfinite()
