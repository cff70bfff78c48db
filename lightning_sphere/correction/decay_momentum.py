"""The momentum of a weight decay coupled into torch's SGD, kept apart so that the rotational mode can take the
decay out of the update as Kosson et al.'s wrapper does (docs/theory.md §9.1)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_sphere.core.groups import Stepped
from lightning_sphere.core.sharding import DTensor, is_dtensor, local
from lightning_sphere.correction.base import ParamGroup, Scheme
from lightning_sphere.correction.safeguards import Plan
from lightning_sphere.kernels.compiled import host_float, scalar

#: The optimizer-state key of the momentum of a weight decay coupled into torch's SGD (§9.1).
DECAY_MOMENTUM = "sphere_decay_momentum"


def _like_param(value: Tensor, param: Tensor) -> Tensor:
    """``value`` (this rank's part) as the optimizer state of ``param``: a DTensor laid out as it is, if it is one."""
    if is_dtensor(param):
        return DTensor.from_local(value, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                                  stride=param.stride())  # fmt: skip
    return value


class CoupledDecay:
    """The decay's momentum of the modules of one rewrite, in their optimizer's state (``"sphere_decay_momentum"``).

    Args:
        rule: the optimizer's registry entry; nothing is kept unless it has ``decay_momentum``.
        optimizer: the optimizer whose state holds the momentum.
        modules: the rewrite's modules, with their param groups.
    """

    def __init__(self, rule: Scheme, optimizer: torch.optim.Optimizer, modules: Sequence[Stepped]) -> None:
        self.rule, self.optimizer, self.modules = rule, optimizer, modules
        #: parameter → whether torch's momentum buffer starts on the step under way (it is then g + λx)
        self.fresh: dict[Tensor, bool] = {}

    def before_step(self) -> None:
        """Whether each parameter's momentum buffer exists before the step (no sync: Python attributes)."""
        if self.rule.decay_momentum is not None:
            state = self.optimizer.state
            self.fresh = {p: state[p].get("momentum_buffer") is None for m in self.modules for p in m.entry.params}

    def __call__(
        self, plan: Plan, groups: list[ParamGroup], x0: dict[Tensor, Tensor]
    ) -> tuple[dict[Tensor, Tensor], list[tuple[Tensor, Tensor]]]:
        """A weight decay coupled into torch's SGD, taken out of the update as Kosson et al.'s wrapper keeps it
        apart (§9.1): its momentum l ← μ l + (1 − τ) λ x_k (l = λ x_k where torch's buffer starts) is kept per
        parameter in the optimizer's state (``"sphere_decay_momentum"``), and the update less the decay is
        Δ − (a x_k + b l), a = ηλ with Nesterov (else 0), b = ημ with Nesterov (else η). Returns the held l by
        parameter and (a, b) per module ((0, 0) where nothing is coupled)."""
        zero = (scalar(0.0), scalar(0.0))
        coefficients: list[tuple[Tensor, Tensor]] = [zero] * len(self.modules)
        held: dict[Tensor, Tensor] = {}
        read = self.rule.decay_momentum
        if read is None:
            return held, coefficients
        state = self.optimizer.state
        for i, (m, group) in enumerate(zip(self.modules, groups, strict=True)):
            lam = host_float(self.rule.weight_decay(group)) or 0.0
            if not plan.allowed[i] or self.rule.decoupled_decay(group) or lam == 0:
                continue
            momentum, dampening, nesterov = read(group)
            lr = host_float(group["lr"]) or 0.0
            coefficients[i] = (scalar(lr * lam if nesterov else 0.0), scalar(lr * momentum if nesterov else lr))
            for p in m.entry.params:
                if p in held:
                    continue
                x = x0[p]
                stored = state[p].get(DECAY_MOMENTUM)
                if stored is None or self.fresh.get(p, True) or momentum == 0:
                    # torch's buffer starts at g + λx; one already running when the tracker starts holds λ times
                    # an average of past weights, taken as x_k's
                    start = 1.0 if self.fresh.get(p, True) or momentum == 0 else (1 - dampening) / (1 - momentum)
                    value = x * (lam * start)
                    state[p][DECAY_MOMENTUM] = _like_param(value, p)
                    held[p] = value
                else:
                    value = local(stored)
                    value.mul_(momentum).add_(x, alpha=(1 - dampening) * lam)
                    held[p] = value
        return held, coefficients
