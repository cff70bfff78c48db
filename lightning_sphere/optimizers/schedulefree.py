"""Schedule-free optimizers in the registry (Defazio et al., arXiv 2405.15682; the ``schedulefree`` package),
docs/theory.md §8.5.

In training mode the model holds y = (1 − β) z + β x, an interpolation between the sequence z the optimizer
steps and x, a running average of z; ``optimizer.eval()`` swaps x in. Every metric describes y, the weights the
model holds and the gradient is taken at: its step Δ = y_{k+1} − y_k is measured as any step is (angle, radial and
tangential parts, the measured effective learning rate sin θ/‖∇L(u_k)‖). What is not defined is not logged: y's
step is no single optimizer's step on y, so no closed-form effective learning rate, no §7 equilibrium (the
averaging's weights change with the step count, and decay acts on z), no update length and no spherical
correction. The optimizers change the gradient in place during their step (AdamW divides it by its
denominator): it is read before.
"""

from __future__ import annotations

from lightning_sphere.correction.base import Rewrite
from lightning_sphere.optimizers.registry import OptimizerRule, ParamGroup, register_optimizer


def _no_spherical_form(group: ParamGroup, mode: str) -> type[Rewrite]:
    raise ValueError(
        "no spherical form here: the model holds an interpolation y = (1 − β) z + β x of the sequence the optimizer "
        "steps (z) and its average (x), whose step is not one optimizer's step on y; train with the correction off"
    )


for _module, _name in (
    ("adamw_schedulefree", "AdamWScheduleFree"),
    ("adamw_schedulefree_closure", "AdamWScheduleFreeClosure"),
    ("radam_schedulefree", "RAdamScheduleFree"),
    ("radam_schedulefree_closure", "RAdamScheduleFreeClosure"),
    ("sgd_schedulefree", "SGDScheduleFree"),
    ("sgd_schedulefree_closure", "SGDScheduleFreeClosure"),
):
    register_optimizer(
        f"schedulefree.{_module}.{_name}",
        OptimizerRule(
            _name,
            formula=False,
            correction=_no_spherical_form,
            update_refusal=(
                "steps a sequence z the model does not hold (the model holds y = (1 − β) z + β x), so that the step of "
                "y is no update of the optimizer's to put on the sphere"
            ),
        ),
    )
