"""Rules for element-wise operations: positively homogeneous maps, sums and products.

An element-wise ``f`` with ``f(ρx) = ρ^k f(x)`` for ρ > 0 keeps every entry in its channel; a sum keeps the degree
of terms that share it; a product adds degrees, and a quotient whose degree comes out 0 is a normalization
(``x / norm(x)``, ``x * rsqrt(var + eps)``).
"""

from __future__ import annotations

from fractions import Fraction

import torch
from torch.autograd.graph import Node

from lightning_sphere.detection.nodes import saved
from lightning_sphere.detection.operations.contractions import same_degree
from lightning_sphere.detection.scaling import (
    NormReached,
    ScaledValue,
    WalkContext,
    compact,
    first_scaled,
    output_shape,
    sole_input,
)


def shift_commuting(walk: WalkContext, node: Node, inputs: list[ScaledValue | None]) -> list[ScaledValue | None]:
    """A copy, f(x + b) = f(x) + b: the value as it was."""
    value = sole_input(walk, node, inputs)
    return [value.moved(value.ids)]


def shift_breaking(walk: WalkContext, node: Node, inputs: list[ScaledValue | None]) -> list[ScaledValue | None]:
    """Positively homogeneous but not commuting with a shift (relu, dropout, abs): after it a centering
    normalization no longer cancels the layer's bias, which joins its channel's group."""
    value = sole_input(walk, node, inputs)
    return [value.moved(value.ids, keeps_shift=False)]


def clamp_min(walk: WalkContext, node: Node, inputs: list[ScaledValue | None]) -> list[ScaledValue | None]:
    """``clamp(x, min)``: ``F.normalize``'s clamp of the norm at eps, or a relu (min 0)."""
    value = sole_input(walk, node, inputs)
    if value.statistic:  # F.normalize's clamp of the norm at eps: the normalization's own approximation
        return [value.moved(value.ids)]
    if saved(node, "_saved_min") == 0:  # relu
        return [value.moved(value.ids, keeps_shift=False)]
    raise walk.break_at(node)


def add(walk: WalkContext, node: Node, inputs: list[ScaledValue | None]) -> list[ScaledValue | None]:
    """A sum (or difference) of two values of one degree, entry for entry both scaling; or a statistic plus a
    constant (the eps of a normalization)."""
    out = output_shape(node)
    present = [v for v in inputs if v is not None]
    constant = [child for child, _ in node.next_functions if child is None] or len(node.next_functions) == 1
    if len(present) == 2 and present[0].degree == present[1].degree:
        a, b = present
        a_ids, b_ids = torch.broadcast_tensors(compact(a.ids.expand(out)), compact(b.ids.expand(out)))
        if bool(((a_ids < 0) != (b_ids < 0)).any()):
            raise walk.break_at(node, ", with entries that do not scale")
        return [
            ScaledValue(
                a.degree,
                walk.merge(a.ids, b.ids).expand(out),
                statistic=a.statistic and b.statistic,
                shift_free=a.shift_free and b.shift_free,
                channels_kept=a.channels_kept and b.channels_kept,
            )
        ]
    if len(present) == 1 and constant and present[0].statistic:
        return [present[0].moved(present[0].ids.expand(out))]  # + eps
    if len(present) == 1 and constant and not present[0].shifted:
        # + a constant: only a divisor that cancels the scale may carry it (q · Σk + eps in ReLU linear attention)
        shifted = present[0].moved(present[0].ids.expand(out))
        shifted.shifted_at = walk.where(node)
        return [shifted]
    raise walk.break_at(node)


def product(
    walk: WalkContext, node: Node, inputs: list[ScaledValue | None], divide: bool = False
) -> list[ScaledValue | None]:
    """``a * b`` (``a / b``): the degrees add (subtract). Degree 0 is a normalization reached."""
    out = output_shape(node)
    a = inputs[0]
    b = inputs[1] if len(inputs) > 1 else None
    degree = (a.degree if a else 0) + (-(b.degree) if divide and b else (b.degree if b else 0))
    base = a or b
    assert base is not None
    if a is not None and b is not None:
        same_degree(walk, node, a.ids.expand(out), b.ids.expand(out))
    ids = walk.merge(a.ids, b.ids) if a is not None and b is not None else base.ids
    if (a is not None and a.shifted) or (b is not None and b.shifted and not (divide and degree == 0)):
        raise walk.break_at(node, ", after a constant was added")
    if degree == 0:
        at = b.shifted_at if divide and b is not None else ""
        walk.norms.append(
            NormReached(node, cancels_shift=False, fused_channel_norm=False, channels_kept=False, constant_at=at)
        )
        return [None]
    return [
        ScaledValue(
            Fraction(degree),
            ids.expand(out),
            statistic=all(v.statistic for v in (a, b) if v is not None),
            shift_free=False,
            channels_kept=(a is None or a.channels_kept) and (b is None or b.channels_kept),
        )
    ]


def quotient(walk: WalkContext, node: Node, inputs: list[ScaledValue | None]) -> list[ScaledValue | None]:
    """``a / b``: see :func:`product`."""
    return product(walk, node, inputs, divide=True)


def power(walk: WalkContext, node: Node, inputs: list[ScaledValue | None]) -> list[ScaledValue | None]:
    """``x ** p`` for a constant p: degree times p (rational, as in ``x ** 0.5``), a statistic on the way to a
    hand-written norm."""
    value = first_scaled(inputs)
    exponent = Fraction(saved(node, "_saved_exponent")).limit_denominator(1000)
    return [ScaledValue(value.degree * exponent, value.ids, statistic=True, shift_free=False, channels_kept=False)]
