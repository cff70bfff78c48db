"""The angular update a group settles at once weight decay balances growth (docs/theory.md §7)."""

from __future__ import annotations

import math


def angular_update_equilibrium(
    kind: str, lr: float, weight_decay: float, momentum: float = 0.0, dampening: float = 0.0
) -> float | None:
    """The angular update, in radians per step, a group settles at once decay balances growth (§7).

    ``kind`` is ``"sgd"`` (``momentum`` is μ, ``0`` without momentum) or ``"adamw"`` (``momentum`` is
    β1). ``None`` where no fixed value exists: no weight decay, or ηλ ≥ 1. SGD-M's ``dampening`` τ scales
    both the gradient and the decay entering the buffer, so it acts as a learning rate η(1 − τ) — our
    derivation, not the paper's wording.

    >>> round(angular_update_equilibrium("sgd", lr=0.1, weight_decay=5e-4, momentum=0.9), 6)
    0.007255
    """
    eta_lambda = lr * weight_decay
    if not 0 < eta_lambda < 1:
        return None
    if kind == "adamw":
        return (2 * eta_lambda * (1 - momentum) / (1 + momentum)) ** 0.5
    if momentum == 0:
        return math.acos(1 - eta_lambda)
    return (2 * eta_lambda * (1 - dampening) / (1 + momentum)) ** 0.5


def filtered_update_equilibrium(eta_lambda: float, filter_ratio: float) -> float | None:
    """The equilibrium angular update of an update whose length is fixed by the optimizer (a normalized update:
    Adam's, Muon's, Lion's), given the autocorrelation of successive updates (§8.1, our derivation): with a
    decoupled decay ηλ, ``√(2ηλ / F)``, F = Σ over all lags of the correlation of the updates. For a linear filter
    of white gradients, u_t = Σ_j c_j g_{t−j}, ``filter_ratio`` = 1/F = Σ c_j² / (Σ c_j)² (AdamW's EMA gives
    (1 − β1)/(1 + β1), the value of §7). ``None`` where no fixed value exists: ηλ outside (0, 1).

    >>> round(filtered_update_equilibrium(1e-3, (1 - 0.9) / (1 + 0.9)), 6)  # AdamW, β1 = 0.9
    0.01026
    """
    if not 0 < eta_lambda < 1:
        return None
    return math.sqrt(2 * eta_lambda * filter_ratio)
