"""The optimizer registry: how each optimizer reads in the generic scheme ``x_{k+1} = x_k − η a ⊘ b``
(docs/theory.md §2), and which spherical correction rewrites it (§4, §6).

Only the exact classes in :data:`OPTIMIZERS` are mapped: a subclass may change its step, and a wrong
``b`` would give a silently wrong effective learning rate, so every other optimizer gets the measured one
(§3) and no correction.

Adding an optimizer is one entry. An Adam-like one whose step is ``η m̂ ⊘ (√v̂ + ε)`` up to its own
bias corrections gives ``moments``; an SGD-like one (b ≡ 1) leaves it ``None``. For instance a subclass
of Adam that keeps its step (subclasses are not mapped by default):

>>> import torch
>>> from lightning_sphere import OptimizerRule, register_optimizer
>>> from lightning_sphere.schemes import adam_moments, rule_of
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
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_sphere.correction import AdamGRewrite, AdamRewrite, MomentumRewrite, Rewrite
from lightning_sphere.geometry import angular_update_equilibrium
from lightning_sphere.kernels import host_float

#: Correction modes; ``True`` means ``"srt"``.
MODES = ("srt", "s", "rt")
SUPPORTED = (
    "Adam and AdamW: 'srt' (True, AdamSRT), 's' (AdamS), 'rt'; SGD with momentum: 'srt' (True, SGDMRT), 'rt'; "
    "SGD without momentum: 'srt' (True, the AdamG rewrite)"
)

ParamGroup = dict[str, Any]


class Moments(NamedTuple):
    """An adaptive optimizer's a and b after a step (§2), as torch stores them:
    a = ``exp_avg`` · ``inv_bias1`` and b = √``exp_avg_sq`` · ``inv_sqrt_bias2`` + ε (the group's ``eps``).

    The bias corrections are 0-dim float64 tensors where the step count lives (no host sync).
    """

    exp_avg: Tensor
    exp_avg_sq: Tensor
    inv_bias1: Tensor
    inv_sqrt_bias2: Tensor


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
    """

    name: str
    moments: Callable[[dict[str, Any], ParamGroup], Moments | None] | None = None
    decoupled_decay: Callable[[ParamGroup], bool] = lambda group: False
    equilibrium: Callable[[ParamGroup], float | None] = lambda group: None
    correction: Callable[[ParamGroup, str], type[Rewrite]] = _refuse
    formula: bool = True
    gradient_intact: bool = False

    @property
    def adaptive(self) -> bool:
        return self.moments is not None

    def decay_factor(self, group: ParamGroup) -> float:
        """1 − ηλ for a decoupled decay, else 1: x_k = (x_{k+1} + η a ⊘ b) / decay_factor."""
        return 1 - group["lr"] * group["weight_decay"] if self.decoupled_decay(group) else 1.0


def adam_moments(state: dict[str, Any], group: ParamGroup) -> Moments | None:
    """torch's Adam and AdamW: the running max of ``exp_avg_sq`` with amsgrad, bias corrections as torch
    computes them from the step count (1 − β2^t is small early on)."""
    if "exp_avg" not in state:
        return None
    beta1, beta2 = group["betas"]
    step = state["step"]  # a CPU tensor, or one on the device (capturable, fused): stay there, no sync
    if not isinstance(step, Tensor):
        step = torch.tensor(float(step))
    step = step.to(torch.float32 if step.device.type == "mps" else torch.float64)
    second = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
    return Moments(state["exp_avg"], second, 1 / (1 - beta1**step), (1 - beta2**step).rsqrt())


def _sgd_equilibrium(group: ParamGroup) -> float | None:
    lr = host_float(group["lr"])
    if lr is None or group["nesterov"]:
        return None
    return angular_update_equilibrium("sgd", lr, group["weight_decay"], group["momentum"], group["dampening"])


def _adamw_equilibrium(group: ParamGroup) -> float | None:
    lr = host_float(group["lr"])
    if lr is None:
        return None
    return angular_update_equilibrium("adamw", lr, group["weight_decay"], host_float(group["betas"][0]))


def _adam_equilibrium(group: ParamGroup) -> float | None:
    return _adamw_equilibrium(group) if _decoupled(group) else None  # L2 decay is rescaled by b: no fixed point


def _decoupled(group: ParamGroup) -> bool:
    return group.get("decoupled_weight_decay", False)


def _common_refusals(name: str, group: ParamGroup) -> None:
    if group.get("maximize", False):
        raise ValueError(f"{name}(maximize=True) is not supported; supported: {SUPPORTED}")


def _sgd_correction(group: ParamGroup, mode: str) -> type[Rewrite]:
    _common_refusals("SGD", group)
    if group["nesterov"]:
        raise ValueError(f"SGD(nesterov=True) is not supported; supported: {SUPPORTED}")
    if group["momentum"] == 0:
        if mode != "srt":
            raise ValueError(f"mode {mode!r} has no meaning for SGD without momentum (no moment to rescale); use 'srt'")
        return AdamGRewrite
    if mode == "s":
        raise ValueError("mode 's' has no meaning for SGD with momentum (no second moment); use 'srt' or 'rt'")
    return MomentumRewrite


def _adam_correction(name: str) -> Callable[[ParamGroup, str], type[Rewrite]]:
    def correction(group: ParamGroup, mode: str) -> type[Rewrite]:
        _common_refusals(name, group)
        if group["amsgrad"]:
            raise ValueError(f"{name}(amsgrad=True) is not supported; supported: {SUPPORTED}")
        return AdamRewrite

    return correction


#: Exact optimizer class → its rule. Extend with :func:`register_optimizer`.
OPTIMIZERS: dict[type[torch.optim.Optimizer], OptimizerRule] = {
    torch.optim.SGD: OptimizerRule(
        "SGD", equilibrium=_sgd_equilibrium, correction=_sgd_correction, gradient_intact=True
    ),
    torch.optim.Adam: OptimizerRule(
        "Adam", adam_moments, _decoupled, _adam_equilibrium, _adam_correction("Adam"), gradient_intact=True
    ),  # ``decoupled_weight_decay=True`` makes it AdamW
    torch.optim.AdamW: OptimizerRule(
        "AdamW", adam_moments, lambda group: True, _adamw_equilibrium, _adam_correction("AdamW"), gradient_intact=True
    ),
}

#: The rule of every optimizer not in :data:`OPTIMIZERS`: measured effective learning rate, no correction.
MEASURED = OptimizerRule("other", formula=False)


def register_optimizer(optimizer_class: type[torch.optim.Optimizer], rule: OptimizerRule) -> None:
    """Map ``optimizer_class`` (exactly; subclasses are not covered) to ``rule``."""
    OPTIMIZERS[optimizer_class] = rule


def rule_of(optimizer: torch.optim.Optimizer) -> OptimizerRule:
    """The rule of ``optimizer``'s exact class, :data:`MEASURED` if it has none."""
    return OPTIMIZERS.get(type(optimizer), MEASURED)


#: Framework wrappers around a torch optimizer: (module, class name) → the attribute holding the optimizer.
_WRAPPERS = {
    ("pytorch_lightning.core.optimizer", "LightningOptimizer"): "_optimizer",
    ("lightning.pytorch.core.optimizer", "LightningOptimizer"): "_optimizer",
    ("lightning.fabric.wrappers", "_FabricOptimizer"): "optimizer",
    ("lightning_fabric.wrappers", "_FabricOptimizer"): "optimizer",
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


def correction_mode(value: bool | str | None) -> str | None:
    """The mode a ``spherical_correction`` argument asks for, ``None`` for none.

    Raises:
        ValueError: for anything but a bool, ``None`` or one of :data:`MODES`.
    """
    if value is None or value is False:
        return None
    if value is True:
        return "srt"
    if isinstance(value, str) and value in MODES:
        return value
    raise ValueError(f"spherical_correction must be True, False or one of {MODES}, got {value!r}")


def rewrite_for(optimizer: torch.optim.Optimizer, group: ParamGroup, mode: str) -> type[Rewrite]:
    """The rewrite algorithm for one param group of ``optimizer`` under ``mode``.

    Raises:
        ValueError: naming the optimizer and what is supported, when no algorithm applies.
    """
    rule = rule_of(optimizer)
    try:
        return rule.correction(group, mode)
    except ValueError as err:
        message = str(err)
        raise ValueError(message if rule is not MEASURED else f"{class_path(type(optimizer))} has {message}") from None


def cannot_invert(optimizer: torch.optim.Optimizer, mode: str) -> str | None:
    """Why ``mode`` cannot undo the steps of one of ``optimizer``'s param groups that hold a weight of two or
    more dimensions (the ones a correction may track), or ``None``: see
    :meth:`~lightning_sphere.correction.Rewrite.cannot_invert`. Call it after :func:`unsupported`."""
    rule = rule_of(optimizer)
    for i, group in enumerate(optimizer.param_groups):
        if any(p.dim() >= 2 for p in group["params"]):
            reason = rewrite_for(optimizer, group, mode).cannot_invert(group, rule)
            if reason:
                return (
                    f"{class_path(type(optimizer))} param group {i} has {reason}. Lower lr or weight_decay so that "
                    "their product is below 1, or turn the correction off"
                )
    return None


def unsupported(optimizer: torch.optim.Optimizer, mode: str) -> str | None:
    """Why ``mode`` cannot rewrite ``optimizer``'s steps, or ``None`` if it can (every param group)."""
    for group in optimizer.param_groups:
        try:
            rewrite_for(optimizer, group, mode)
        except ValueError as err:
            return str(err)
    return None
