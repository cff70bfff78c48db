"""The gradient test's thresholds (docs/theory.md §1.2): what |cos(g, x)| an invariant group may show.

Shared by detection (which candidates pass), measurement (which tracked modules turned radial) and correction
(which modules stop being rewritten).
"""

from __future__ import annotations

import math

import torch

from lightning_sphere.core.groups import InvariantGroups

#: The gradient test (§1), made relative to what a direction unrelated to x shows: a random unit vector in
#: d dimensions has E cos² = 1/d, so |cos(g, x)| ≈ 1/√d, which is 1e-3 at d = 10⁶ (a fixed threshold has no
#: power there). A group passes while max |cos(g, x)| ≤ δ/√d. For candidates whose invariance the structure
#: vouches for (the autograd graph, weight normalization, a ``groups=`` mapping) the test guards against
#: the structure being misread and against a norm's eps dominating: δ = 0.1. A channel whose pre-norm
#: variance is small next to the norm's eps is only approximately invariant and shows more.
COSINE_TOLERANCE = 0.1


#: δ for ``groups="numeric"`` candidates, which only the gradient vouches for: a random direction passes
#: with probability ≈ 0.8 δ (|cos|·√d is about standard normal), 1 in 125 groups, whatever d.
NUMERIC_TOLERANCE = 0.01


#: ``norm_type`` of the candidates only the gradient vouches for.
GRADIENT_TEST = "gradient test"


def random_cosine(group_size: int) -> float:
    """The typical |cos(g, x)| of a direction g unrelated to x in ``group_size`` dimensions: 1/√d."""
    return 1 / math.sqrt(group_size)


def noise_floor(dtype: torch.dtype) -> float:
    """The |cos(g, x)| an invariant group shows from round-off alone: four ulps for gradients computed in
    16 bits (float16 3.9e-3, bfloat16 3.1e-2), negligible in float32 and float64 next to δ/√d for any d
    a weight tensor reaches (summation errors are ~1e-7·log₂ d)."""
    return 4 * torch.finfo(dtype).eps if dtype in (torch.float16, torch.bfloat16) else 0.0


def cosine_tolerance(dtype: torch.dtype, tolerance: float = 1e-3) -> float:
    """An absolute |cos(g, x)| threshold widened to :func:`noise_floor` for ``dtype``."""
    return max(tolerance, noise_floor(dtype))


def tolerance_for(
    entry: InvariantGroups, tolerance: float | None = None, compute_dtype: torch.dtype | None = None
) -> float:
    """The largest max |cos(g, x)| over ``entry``'s groups that passes the gradient test: δ/√d, δ the
    ``tolerance`` (``None``: :data:`COSINE_TOLERANCE`, or :data:`NUMERIC_TOLERANCE` for numeric candidates and
    for a normalization whose eps is a constant of unknown size),
    and at least the round-off :func:`noise_floor` of its weights' dtype and of ``compute_dtype``."""
    if tolerance is None:
        strict = entry.norm_type == GRADIENT_TEST or bool(entry.unknown_eps)  # what only the gradient vouches for
        tolerance = NUMERIC_TOLERANCE if strict else COSINE_TOLERANCE
    floor = max(noise_floor(d) for d in (entry.slices[0].param.dtype, compute_dtype or torch.float32))
    return max(tolerance * random_cosine(entry.group_size), floor)


def indistinct(entry: InvariantGroups, compute_dtype: torch.dtype | None = None) -> bool:
    """Whether round-off alone reaches half of what a random direction shows: the gradient test cannot
    tell an invariant group from another (large groups with 16-bit gradients)."""
    floor = max(noise_floor(d) for d in (entry.slices[0].param.dtype, compute_dtype or torch.float32))
    return floor >= random_cosine(entry.group_size) / 2
