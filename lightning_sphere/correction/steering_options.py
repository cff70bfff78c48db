"""The rotational and hyperball modes as a user asks for them: :class:`Rotational` and :class:`Hyperball`, their
arguments checked at construction, and the rotational mode's target angle (docs/theory.md §9). The algorithms are
:mod:`lightning_sphere.correction.steering`'s."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from lightning_sphere.correction.base import ParamGroup

#: A target angular update: radians per step, or param group → radians (``None``: none for that group).
AngularUpdate = float | Callable[[ParamGroup], float | None]


@dataclass(frozen=True)
class Rotational:
    """``spherical_correction=Rotational(...)``: Kosson et al.'s rotational variant of the base optimizer on every
    detected group (arXiv:2305.17212, their Algorithm 1; docs/theory.md §9.1). The update is centered (optional),
    projected onto the tangent space, divided by the running RMS of its norm, and scaled so that the expected
    angular update is η_r; the group keeps its norm. ``"rotational"`` means the defaults, theirs.

    Args:
        update_norm_decay: β of the exponential average of ‖u_⊥‖² (their ``update_norm_decay_factor``), in
            [0, 1); the average is bias-corrected by 1 − β^t, t the group's corrected steps.
        center: subtract the group's mean from the update, and center the group's weights once, at its first
            corrected step, keeping their norm (their ``zero_mean``, which centers at construction). Centering
            changes the layer's output unless its input is centered: ``False`` keeps the weights as they are.
        eps: added to the running RMS before dividing (their ``rotational_eps``).
        angular_update: the target η_r, radians per step, or param group → η_r; ``None``: the base optimizer's
            equilibrium angular update from the optimizer registry (§7–§8: SGD-M, AdamW, Lion, Muon, Prodigy).

    Raises:
        ValueError: for an argument out of range.
    """

    update_norm_decay: float = 0.9
    center: bool = True
    eps: float = 1e-8
    angular_update: AngularUpdate | None = None

    name: ClassVar[str] = "rotational"

    def __post_init__(self) -> None:
        if not isinstance(self.center, bool):
            raise ValueError(f"Rotational(center) must be True or False, got {self.center!r}")
        for field in ("update_norm_decay", "eps"):
            if isinstance(getattr(self, field), bool) or not isinstance(getattr(self, field), int | float):
                raise ValueError(f"Rotational({field}) must be a number, got {getattr(self, field)!r}")
        if not 0 <= self.update_norm_decay < 1:
            raise ValueError(f"Rotational(update_norm_decay) must be in [0, 1), got {self.update_norm_decay!r}")
        if not self.eps >= 0:
            raise ValueError(f"Rotational(eps) must be ≥ 0, got {self.eps!r}")
        target = self.angular_update
        number = isinstance(target, int | float) and not isinstance(target, bool)
        if target is not None and not callable(target) and not (number and target > 0):
            raise ValueError(
                f"Rotational(angular_update) must be a positive number of radians per step, a function of the param "
                f"group, or None for the optimizer's equilibrium; got {target!r}"
            )


@dataclass(frozen=True)
class Hyperball:
    """``spherical_correction=Hyperball(...)``: each detected group held at a fixed radius R with a step of
    length ηR, x ← R·normalize(x − ηR·normalize(u)), u the base optimizer's update without its weight decay
    (AdamH, MuonH: Wen et al., arXiv:2606.16899; docs/theory.md §9.2). ``"hyperball"`` means the defaults.

    A decoupled weight decay is not applied to the groups (at a fixed radius it means nothing); a decay coupled
    into the gradient (torch's SGD, Adam's L2) cannot be taken out of the update, and is refused.

    Args:
        radius: R for every group; ``None``: each group's norm at its first corrected step (a group still at
            zero is left to the base optimizer until it has one).

    Raises:
        ValueError: for a radius that is not positive.
    """

    radius: float | None = None

    name: ClassVar[str] = "hyperball"

    def __post_init__(self) -> None:
        number = isinstance(self.radius, int | float) and not isinstance(self.radius, bool)
        if self.radius is not None and not (number and self.radius > 0):
            raise ValueError(f"Hyperball(radius) must be a positive number or None, got {self.radius!r}")


#: The modes that steer any optimizer's update.
Steering = Rotational | Hyperball


def rotational_target(options: Rotational, group: ParamGroup, rule: Any) -> float | None:
    """η_r for one param group (as the step used it): the option's, else the registry's equilibrium."""
    target = options.angular_update
    if target is None:
        value = rule.equilibrium(group)
    elif callable(target):
        value = target(group)
    else:
        value = target
    return None if value is None or not math.isfinite(value) or value <= 0 else float(value)
