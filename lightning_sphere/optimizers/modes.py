"""The ``spherical_correction`` modes, and which algorithm rewrites which optimizer's steps under each."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_sphere.correction.base import Rewrite
from lightning_sphere.correction.steering import HyperballRewrite, RotationalRewrite
from lightning_sphere.correction.steering_options import Hyperball, Rotational, Steering, rotational_target
from lightning_sphere.optimizers.registry import MEASURED, MODES, OptimizerRule, ParamGroup, class_path, rule_of

#: A correction mode: one of §4–§6's by name, or one of §9's with its arguments.
Mode = str | Steering


def correction_mode(value: bool | str | Steering | None) -> Mode | None:
    """The mode a ``spherical_correction`` argument asks for, ``None`` for none: ``True`` is ``"srt"``;
    ``"rotational"`` and ``"hyperball"`` are :class:`~lightning_sphere.Rotational` and
    :class:`~lightning_sphere.Hyperball` with their defaults, which may also be given themselves.

    Raises:
        ValueError: for anything but a bool, ``None``, one of :data:`MODES`, a ``Rotational`` or a ``Hyperball``.
    """
    if value is None or value is False:
        return None
    if value is True:
        return "srt"
    if isinstance(value, Rotational | Hyperball):
        return value
    if value == "rotational":
        return Rotational()
    if value == "hyperball":
        return Hyperball()
    if isinstance(value, str) and value in MODES:
        return value
    raise ValueError(
        f"spherical_correction must be True, False, one of {MODES}, a Rotational(...) or a Hyperball(...), "
        f"got {value!r}"
    )


def rewrite_for(optimizer: torch.optim.Optimizer, group: ParamGroup, mode: Mode) -> type[Rewrite]:
    """The rewrite algorithm for one param group of ``optimizer`` under ``mode``.

    Raises:
        ValueError: naming the optimizer and what is supported, when no algorithm applies.
    """
    rule = rule_of(optimizer)
    if isinstance(mode, Rotational | Hyperball):
        return _steering(optimizer, rule, group, mode)
    try:
        return rule.correction(group, mode)
    except ValueError as err:
        message = str(err)  # "no spherical form …" is said of the class: name it (Muon next to AdamW in one run)
        named = message.startswith("no spherical form")
        raise ValueError(f"{class_path(type(optimizer))} has {message}" if named else message) from None


def _steering(
    optimizer: torch.optim.Optimizer, rule: OptimizerRule, group: ParamGroup, mode: Steering
) -> type[Rewrite]:
    """The rotational or hyperball rewrite of §9 for ``group`` (one that holds tracked layers), or ``ValueError``
    saying why it cannot apply and what to change."""
    name, what = class_path(type(optimizer)), f"spherical_correction={mode!r}"
    _class_refusal(optimizer, rule, mode)
    if group.get("maximize", False):
        raise ValueError(f"{what}: {name}(maximize=True) is not supported")
    lr = group.get("lr")
    if lr is None:
        raise ValueError(f"{what}: {name}'s param groups have no 'lr', the step length the mode needs")
    if isinstance(lr, Tensor) and lr.device.type != "cpu":
        raise ValueError(
            f"{what}: {name}'s lr is a tensor on {lr.device}; reading it every step would wait for the device. Give "
            "the optimizer a float lr (or a tensor on the CPU)"
        )
    decay = _float(rule.weight_decay(group))
    if isinstance(mode, Hyperball) and decay:
        if rule is MEASURED:
            raise ValueError(
                f"{what}: lightning_sphere does not know how {name} applies its weight_decay={decay:g}, so it cannot "
                "leave it out of the update. Set weight_decay=0 in the param group of the tracked layers, or register "
                "the optimizer (register_optimizer)"
            )
        if not rule.decoupled_decay(group):
            raise ValueError(
                f"{what}: {name}'s weight_decay={decay:g} is added to the gradient, so it is part of the update and "
                "cannot be taken out; at a fixed radius a decay means nothing. Set weight_decay=0 in the param group "
                "of the tracked layers (other layers may keep theirs), or use an optimizer with a decoupled decay "
                "(AdamW), which the hyperball leaves out of those groups"
            )
    if isinstance(mode, Rotational):
        probe = group if _float(lr) else {**group, "lr": 1e-8}  # a warm-up from 0: the target exists later
        if rotational_target(mode, rule.in_force(probe, probe), rule) is None:
            raise ValueError(f"{what}: {_no_target(name, rule, mode, probe, decay)}")
        return RotationalRewrite
    return HyperballRewrite


def _no_target(name: str, rule: OptimizerRule, mode: Rotational, group: ParamGroup, decay: float) -> str:
    """Why the rotational mode has no target angular update for ``group``, and what to do."""
    give = "give the target: Rotational(angular_update=radians per step, or a function of the param group)"
    target = mode.angular_update
    if callable(target):
        return (
            f"Rotational(angular_update=...) returned {target(group)!r} for this param group of {name}; return a "
            "positive angle in radians per step for every param group that holds tracked layers"
        )
    if rule is MEASURED:
        return f"{name} is outside the optimizer registry, which alone knows equilibrium angles (§7–§8); {give}"
    if not decay:
        return (
            f"{name}'s param group has weight_decay=0; its equilibrium angle (§7–§8) needs a weight decay. Set one "
            f"on the param group of the tracked layers, or {give}"
        )
    why = []
    if group.get("nesterov"):
        why.append("nesterov=True")
    if rule.adaptive and not rule.decoupled_decay(group):  # Adam's L2: rescaled by b, no fixed point (§7)
        why.append(f"a weight_decay={decay:g} added to the gradient")
    because = f" ({', '.join(why)})" if why else ""
    return (
        f"the optimizer registry knows no equilibrium angle for {name} with these hyper-parameters{because} "
        f"(docs/theory.md §8.7 lists what it knows); {give}"
    )


def _class_refusal(optimizer: torch.optim.Optimizer, rule: OptimizerRule, mode: Steering) -> None:
    """``ValueError`` for an optimizer class §9's modes cannot steer at all."""
    if rule.update_refusal:
        raise ValueError(f"spherical_correction={mode!r}: {class_path(type(optimizer))} {rule.update_refusal}")


def _float(value: Any) -> float:
    return float(value) if value is not None else 0.0


def cannot_invert(optimizer: torch.optim.Optimizer, mode: Mode) -> str | None:
    """Why ``mode`` cannot undo the steps of one of ``optimizer``'s param groups that hold a weight of two or
    more dimensions (the ones a correction may track), or ``None``: see
    :meth:`~lightning_sphere.correction.Rewrite.cannot_invert`. Call it after :func:`unsupported`."""
    rule = rule_of(optimizer)
    if isinstance(mode, Rotational | Hyperball):
        return None  # x_k is copied, not undone
    for i, group in enumerate(optimizer.param_groups):
        if any(p.dim() >= 2 for p in group["params"]):
            reason = rewrite_for(optimizer, group, mode).cannot_invert(group, rule)
            if reason:
                return (
                    f"{class_path(type(optimizer))} param group {i} has {reason}. Lower lr or weight_decay so that "
                    "their product is below 1, or turn the correction off"
                )
    return None


def unsupported(optimizer: torch.optim.Optimizer, mode: Mode) -> str | None:
    """Why ``mode`` cannot rewrite ``optimizer``'s steps, or ``None`` if it can: every param group; under the
    rotational and hyperball modes, only what the class allows (which param groups hold tracked layers is known once
    the groups are, and each is checked then: :func:`rewrite_for` on a module's param group)."""
    if isinstance(mode, Rotational | Hyperball):
        try:
            _class_refusal(optimizer, rule_of(optimizer), mode)
        except ValueError as err:
            return str(err)
        return None
    for group in optimizer.param_groups:
        try:
            rewrite_for(optimizer, group, mode)
        except ValueError as err:
            return str(err)
    return None
