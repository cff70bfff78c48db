"""Rules for reductions: pooling, sums and means, and the statistics of a hand-written normalization.

A reduction over entries of several channels ties them (:meth:`~lightning_sphere.detection.scaling.WalkContext.reduce`);
one over entries that do and do not scale breaks the scale. Pooling keeps channels apart (dims 0 and 1 of an
``(N, C, *)`` tensor). A variance scales by ρ², a norm or a standard deviation by ρ: the statistics that a
division later cancels.
"""

from __future__ import annotations

from fractions import Fraction

from torch.autograd.graph import Node

from lightning_sphere.detection.scaling import (
    ScaledValue,
    WalkContext,
    compact,
    first_scaled,
    output_shape,
    reshape_ids,
    saved_dims,
    sole_input,
)


def pooling(walk: WalkContext, node: Node, inputs: list[ScaledValue | None]) -> list[ScaledValue | None]:
    """A pooling or an upsampling of an ``(N, C, *)`` tensor, whose channels must be constant over ``*``."""
    value = sole_input(walk, node, inputs)
    flat = compact(value.ids).flatten(2)
    if not bool((flat == flat[:, :, :1]).all()):
        raise walk.break_at(node, ", mixing channels")
    ids = flat[:, :, :1].reshape(*flat.shape[:2], *[1] * (value.ids.dim() - 2))
    return [value.moved(ids.expand(output_shape(node)))]


def reduction(walk: WalkContext, node: Node, inputs: list[ScaledValue | None]) -> list[ScaledValue | None]:
    """A sum, mean or max over the node's saved dimensions (all when it saved none): homogeneous of degree 1."""
    value = first_scaled(inputs)
    ids = walk.reduce(node, value.ids, saved_dims(node, value.ids.dim()))
    return [value.moved(reshape_ids(ids, output_shape(node)), keeps_channels=False)]


def statistic(
    walk: WalkContext, node: Node, inputs: list[ScaledValue | None], factor: Fraction | int, reduces: bool
) -> list[ScaledValue | None]:
    """A statistic of a scale (variance, norm, square root...): degree times ``factor``, reduced over the
    node's saved dimensions if ``reduces``."""
    value = sole_input(walk, node, inputs)
    ids = value.ids
    if reduces:
        ids = reshape_ids(walk.reduce(node, ids, saved_dims(node, ids.dim())), output_shape(node))
    return [ScaledValue(value.degree * factor, ids, statistic=True, shift_free=False, channels_kept=False)]


def statistic_and_mean(
    walk: WalkContext, node: Node, inputs: list[ScaledValue | None], factor: Fraction | int
) -> list[ScaledValue | None]:
    """``var_mean``, ``std_mean``: the statistic (degree times ``factor``), and the mean (degree 1)."""
    value = first_scaled(inputs)
    ids = reshape_ids(walk.reduce(node, value.ids, saved_dims(node, value.ids.dim())), output_shape(node))
    return [
        ScaledValue(value.degree * factor, ids, statistic=True, shift_free=False, channels_kept=False),
        ScaledValue(value.degree, ids, shift_free=False, channels_kept=False),
    ]
