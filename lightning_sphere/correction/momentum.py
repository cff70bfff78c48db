"""SGDMRT: R and T on SGD's momentum buffer (docs/theory.md §6.3)."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from lightning_sphere.core.groups import ParamSlice
from lightning_sphere.correction.base import ParamGroup, Rewrite, _finite, _transport_coefficients
from lightning_sphere.correction.safeguards import Plan
from lightning_sphere.kernels.compiled import scalar
from lightning_sphere.kernels.rewrites import RewriteSums


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
            grad = s.param.grad
            assert grad is not None  # per_slice runs on an allowed module, whose slices all have one (Guard.plan)
            return self.kernels.momentum_sums(x1, buf, s.rows(grad), scalar(group["lr"]))

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
