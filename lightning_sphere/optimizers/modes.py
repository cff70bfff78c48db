"""The ``spherical_correction`` modes, and which algorithm rewrites which optimizer's steps under each."""

from __future__ import annotations

import torch

from lightning_sphere.correction.base import Rewrite
from lightning_sphere.optimizers.registry import MODES, ParamGroup, class_path, rule_of


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
        message = str(err)  # "no spherical form …" is said of the class: name it (Muon next to AdamW in one run)
        named = message.startswith("no spherical form")
        raise ValueError(f"{class_path(type(optimizer))} has {message}" if named else message) from None


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
