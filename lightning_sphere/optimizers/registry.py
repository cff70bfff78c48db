"""The optimizer registry: how each optimizer reads in the generic scheme ``x_{k+1} = x_k − η a ⊘ b``
(docs/theory.md §2), and which spherical correction rewrites it (§4, §6).

Only the exact classes in :data:`OPTIMIZERS` are mapped: a subclass may change its step, and a wrong
``b`` would give a silently wrong effective learning rate, so every other optimizer gets the measured one
(§3) and no correction. torch's SGD is registered by :mod:`lightning_sphere.optimizers.sgd`, Adam and AdamW by
:mod:`lightning_sphere.optimizers.adam`.

Adding an optimizer is one entry. An Adam-like one whose step is ``η m̂ ⊘ (√v̂ + ε)`` up to its own
bias corrections gives ``moments``; an SGD-like one (b ≡ 1) leaves it ``None``. For instance a subclass
of Adam that keeps its step (subclasses are not mapped by default):

>>> import torch
>>> from lightning_sphere import OptimizerRule, register_optimizer
>>> from lightning_sphere.optimizers import adam_moments, rule_of
>>> class MyAdam(torch.optim.Adam):
...     pass
>>> register_optimizer(MyAdam, OptimizerRule("MyAdam", moments=adam_moments))
>>> rule_of(MyAdam([torch.nn.Parameter(torch.zeros(3))])).adaptive
True

An optimizer outside the scheme (Lion's sign step, say) needs no entry: its effective learning rate is
measured. ``correction`` is for optimizers that one of the rewrite algorithms of
:mod:`lightning_sphere.correction` describes exactly.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lightning_sphere.core.groups import InvariantGroups
from lightning_sphere.correction.base import Moments, ParamGroup, Rewrite

#: Correction modes; ``True`` means ``"srt"``. The last two steer any optimizer's update (docs/theory.md §9) and
#: also come as :class:`~lightning_sphere.Rotational` and :class:`~lightning_sphere.Hyperball` with arguments.
MODES = ("srt", "s", "rt", "rotational", "hyperball")


SUPPORTED = (
    "Adam and AdamW: 'srt' (True, AdamSRT), 's' (AdamS), 'rt'; SGD with momentum: 'srt' (True, SGDMRT), 'rt'; "
    "SGD without momentum: 'srt' (True, the AdamG rewrite); any optimizer whose step is one update: 'rotational', "
    "'hyperball'"
)


def _refuse(group: ParamGroup, mode: str) -> type[Rewrite]:
    raise ValueError(f"no spherical form here; supported: {SUPPORTED}")


@dataclass(frozen=True)
class OptimizerRule:
    """Everything lightning_sphere needs to know about one optimizer class.

    Attributes:
        name: the name the messages use.
        moments: ``(state, param_group) → Moments`` of a parameter after a step (``None`` before its first);
            ``None`` for a non-adaptive optimizer (b ≡ 1).
        decoupled_decay: whether a param group's weight decay is decoupled (AdamW), so that the step is
            ``x_{k+1} = (1 − ηλ) x_k − η a ⊘ b``; otherwise it is part of ``a`` (L2).
        equilibrium: the §7 angular update (radians) a param group's hyper-parameters predict, or ``None``.
        correction: ``(param_group, mode) → `` the rewrite algorithm that makes this optimizer follow the
            spherical form ``mode``; raises ``ValueError`` saying why when it cannot.
        formula: the closed-form effective learning rate of §3 applies (else the measured one).
        gradient_intact: ``step()`` reads ``p.grad`` and leaves it as it found it, so that a measurement may read
            it after the step (checked on every measured step) instead of copying it before. ``False`` (the
            default, and for every optimizer outside the registry): it is copied right before the update, since
            optimizers may change it in place (schedule-free's division by its denominator) or drop it.
        lr_in_force: ``(before, after) → η``, the learning rate the step used, from a param group as it was before
            the step and as the step left it: the scheduled ``lr`` by default; Prodigy's d·lr·(bias correction),
            whose d the step itself moves. Every other reading (``moments`` aside) sees the group after the step
            with this ``lr``.
        update_length: ``(param_group, entry, state) → (length, relative)``: the length of one group's update (the
            step less a decoupled decay) the hyper-parameters predict, ``length + relative · r_k``, for optimizers
            whose update has a length of its own (Muon's orthogonalized momentum, Lion's sign, Adafactor's
            clipped relative step; §8); ``None``: none predicted. ``entry`` is the tracked module's
            :class:`~lightning_sphere.core.groups.InvariantGroups`, ``state`` its first parameter's optimizer state.
        weight_decay: ``param_group → λ``, the decay rate per unit of η (the group's ``weight_decay`` by default).
        specialize: ``optimizer → rule``, for a class whose reading depends on how the instance was built (Lion's
            ``decoupled_weight_decay``); ``None``: the rule as it is.
        update_refusal: why the rotational and hyperball modes (§9) cannot steer this optimizer's steps (its step is
            no single update of the weights the model holds), or ``None``: they can.
        decay_momentum: ``param_group → (μ, τ, nesterov)`` of the momentum a weight decay coupled into the gradient
            goes through (torch's SGD: the buffer μ b + (1 − τ)(g + λx)), so that the rotational mode can take the
            decay out of the update (§9.1); ``None`` where no such decay is known.
    """

    name: str
    moments: Callable[[dict[str, Any], ParamGroup], Moments | None] | None = None
    decoupled_decay: Callable[[ParamGroup], bool] = lambda group: False
    equilibrium: Callable[[ParamGroup], float | None] = lambda group: None
    correction: Callable[[ParamGroup, str], type[Rewrite]] = _refuse
    formula: bool = True
    gradient_intact: bool = False
    lr_in_force: Callable[[ParamGroup, ParamGroup], Any] = lambda before, after: before["lr"]
    weight_decay: Callable[[ParamGroup], Any] = lambda group: group.get("weight_decay", 0.0)
    update_length: Callable[[ParamGroup, InvariantGroups, dict[str, Any]], tuple[float, float] | None] | None = None
    specialize: Callable[[torch.optim.Optimizer], OptimizerRule] | None = None
    update_refusal: str | None = None
    decay_momentum: Callable[[ParamGroup], tuple[float, float, bool]] | None = None

    @property
    def adaptive(self) -> bool:
        return self.moments is not None

    def decay_factor(self, group: ParamGroup) -> float:
        """1 − ηλ for a decoupled decay, else 1: x_k = (x_{k+1} + η a ⊘ b) / decay_factor."""
        return 1 - group["lr"] * self.weight_decay(group) if self.decoupled_decay(group) else 1.0

    def in_force(self, before: ParamGroup, after: ParamGroup) -> ParamGroup:
        """The param group as the step used it: as the step left it, with the learning rate in force."""
        return {**after, "lr": self.lr_in_force(before, after)}


def _common_refusals(name: str, group: ParamGroup) -> None:
    if group.get("maximize", False):
        raise ValueError(f"{name}(maximize=True) is not supported; supported: {SUPPORTED}")


#: Exact optimizer class → its rule. Extend with :func:`register_optimizer`.
OPTIMIZERS: dict[type[torch.optim.Optimizer], OptimizerRule] = {}
#: The rules of classes of other packages, by the dotted path of the module that defines them and their name
#: (``"lion_pytorch.lion_pytorch.Lion"``): known without importing those packages.
BY_PATH: dict[str, OptimizerRule] = {}


#: The rule of every optimizer not in :data:`OPTIMIZERS`: measured effective learning rate, no correction of §4–§6.
MEASURED = OptimizerRule("other", formula=False)

#: LBFGS: measured, and nothing to steer.
OPTIMIZERS[torch.optim.LBFGS] = OptimizerRule(
    "LBFGS",
    formula=False,
    update_refusal=(
        "takes a line search over several evaluations of its closure per step, not one update of the weights "
        "that could be put on the sphere"
    ),
)


def register_optimizer(optimizer_class: type[torch.optim.Optimizer] | str, rule: OptimizerRule) -> None:
    """Map ``optimizer_class`` (exactly; subclasses are not covered) to ``rule``. A string names a class by the
    module that defines it, ``"package.module.Class"``, so that a rule for another package's optimizer needs no
    import of that package."""
    if isinstance(optimizer_class, str):
        BY_PATH[optimizer_class] = rule
    else:
        OPTIMIZERS[optimizer_class] = rule


def rule_of(optimizer: torch.optim.Optimizer) -> OptimizerRule:
    """The rule of ``optimizer``'s exact class (by the class, else by its defining module's path), specialized to the
    instance where the rule asks for it; :data:`MEASURED` if it has none."""
    cls = type(optimizer)
    rule = OPTIMIZERS.get(cls) or BY_PATH.get(f"{cls.__module__}.{cls.__qualname__}", MEASURED)
    return rule.specialize(optimizer) if rule.specialize is not None else rule


#: Framework wrappers around a torch optimizer: (module, class name) → the attribute holding the optimizer.
_WRAPPERS = {
    ("pytorch_lightning.core.optimizer", "LightningOptimizer"): "_optimizer",
    ("lightning.pytorch.core.optimizer", "LightningOptimizer"): "_optimizer",
    ("lightning.fabric.wrappers", "_FabricOptimizer"): "optimizer",
    ("lightning_fabric.wrappers", "_FabricOptimizer"): "optimizer",
    ("accelerate.optimizer", "AcceleratedOptimizer"): "optimizer",  # Hugging Face's Trainer
}


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind Lightning's ``LightningOptimizer`` or Fabric's ``_FabricOptimizer`` (whose class
    is made up on the fly, ``FabricSGD``, and so in no registry); any other optimizer as it is."""
    while True:
        attribute = next(
            (_WRAPPERS[key] for cls in type(optimizer).__mro__ if (key := (cls.__module__, cls.__name__)) in _WRAPPERS),
            None,
        )
        if attribute is None:
            return optimizer
        optimizer = getattr(optimizer, attribute)


def class_path(cls: type) -> str:
    """``cls`` by its shortest public import path: ``torch.optim.SGD``, ``heavyball.AdamW`` — a bare ``AdamW``
    would read like torch's."""
    parts = cls.__module__.split(".")
    for i in range(1, len(parts) + 1):
        module = sys.modules.get(".".join(parts[:i]))
        if module is not None and getattr(module, cls.__qualname__, None) is cls:
            return f"{'.'.join(parts[:i])}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"
