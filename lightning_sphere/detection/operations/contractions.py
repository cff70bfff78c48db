"""Rules for contractions: matrix products, convolutions and attention.

A contraction sums products over a dimension: the degrees of its two operands add, and the channels met along
the contracted dimension tie (:meth:`~lightning_sphere.detection.scaling.WalkContext.reduce`).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor
from torch.autograd.graph import Node

from lightning_sphere.detection.nodes import saved
from lightning_sphere.detection.scaling import (
    ScaledValue,
    WalkContext,
    compact,
    output_shape,
    reshape_ids,
    sole_input,
)


def matmul(walk: WalkContext, node: Node, inputs: list[ScaledValue | None]) -> list[ScaledValue | None]:
    """``a @ b`` (``mm``, ``bmm``): ``a`` contracted over its last dimension, ``b`` over its second to last."""
    a, b = inputs[0], inputs[1]
    out = output_shape(node)
    ids = None
    if a is not None:
        ids = walk.reduce(node, a.ids, [a.ids.dim() - 1]).expand(out)
    if b is not None:
        other = walk.reduce(node, b.ids, [b.ids.dim() - 2]).expand(out)
        if ids is not None:
            same_degree(walk, node, ids, other)
        ids = other if ids is None else walk.merge(ids, other)
    degree = (a.degree if a else 0) + (b.degree if b else 0)
    assert ids is not None
    return [ScaledValue(Fraction(degree), ids, shift_free=False, channels_kept=False)]


def convolution(walk: WalkContext, node: Node, inputs: list[ScaledValue | None]) -> list[ScaledValue | None]:
    """A convolution of a scaled input ``(N, C_in, *)`` or by a scaled weight ``(C_out, C_in, *k)`` (not
    transposed, not grouped): each output entry ties all the input's channels, or scales with its filter. Its bias,
    if any, adds a constant per output channel, which a normalization with batch statistics right after cancels
    (:attr:`~lightning_sphere.detection.scaling.ScaledValue.offset`)."""
    bias = saved(node, "_saved_bias_sym_sizes_opt")
    biased = bias is not None and math.prod(bias) > 0
    x, w = inputs[0], inputs[1]
    if biased and ((len(inputs) > 2 and inputs[2] is not None) or (x is not None and w is not None)):
        raise walk.break_at(node, ", a bias on the way")
    out = output_shape(node)
    ids = None
    groups = saved(node, "_saved_groups")
    if x is not None and groups > 1 and not saved(node, "_saved_transposed"):
        # each output channel of group g sums the input channels of group g alone
        n, c_in, *space = x.ids.shape
        grouped = walk.reduce(node, reshape_ids(x.ids, (n, groups, c_in // groups, *space)), range(2, x.ids.dim() + 1))
        shape = (out[0], groups, out[1] // groups, *out[2:])
        ids = reshape_ids(grouped.expand(shape), out)
    elif x is not None:
        ids = walk.reduce(node, x.ids, list(range(1, x.ids.dim()))).expand(out)
    if w is not None:
        if saved(node, "_saved_transposed") or saved(node, "_saved_groups") != 1:
            raise walk.break_at(node)
        per = walk.reduce(node, w.ids, list(range(1, w.ids.dim()))).flatten()
        other = per.view(1, -1, *[1] * (len(out) - 2)).expand(out)
        if ids is not None:
            same_degree(walk, node, ids, other)
        ids = other if ids is None else walk.merge(ids, other)
    degree = (x.degree if x else 0) + (w.degree if w else 0)
    assert ids is not None
    value = ScaledValue(Fraction(degree), ids, shift_free=False, channels_kept=False)
    if biased and x is None:  # the walk started from this weight: the bias is the layer's own
        return [walk.add_bias(node, 2, value, dim=1)]
    if biased:
        value.offset, value.offset_at = tuple(out), walk.where(node)
    return [value]


def addmm(walk: WalkContext, node: Node, inputs: list[ScaledValue | None]) -> list[ScaledValue | None]:
    """``bias + a @ b`` (``nn.Linear`` on a matrix): the product as :func:`matmul`, the bias a constant per output
    feature (dim 1), which a batch-statistics normalization right after cancels; a scaled bias breaks the scale."""
    if inputs[0] is not None:
        raise walk.break_at(node)
    (value,) = matmul(walk, node, inputs[1:])
    assert value is not None
    if inputs[1] is None:  # the walk started from the weight (``F.linear(x, w, b)``): the bias is the layer's own
        return [walk.add_bias(node, 0, value, dim=-1)]
    value.offset, value.offset_at = tuple(output_shape(node)), walk.where(node)
    return [value]


def same_degree(walk: WalkContext, node: Node, a: Tensor, b: Tensor) -> None:
    """A product of two scaled operands, ``a`` and ``b`` the channels each brings to every output entry: an entry
    where only one of them scales does not scale as the others (ρ^k instead of ρ^(k+l)), which one degree per
    value cannot say (v padded with ones, as ReLU linear attention does): the scale breaks."""
    a, b = torch.broadcast_tensors(compact(a), compact(b))
    if bool(((a >= 0) != (b >= 0)).any()):
        raise walk.break_at(node, ", a product with entries where one factor alone scales")


def embedding(walk: WalkContext, node: Node, inputs: list[ScaledValue | None]) -> list[ScaledValue | None]:
    """``F.embedding(indices, weight)`` of a scaled weight ``(V, D)``: each output vector is the row its index
    picks, and scales as that row (a gather: entries move, nothing is summed)."""
    value = sole_input(walk, node, inputs)
    indices = saved(node, "_saved_indices")
    picked = compact(value.ids)[indices.to(value.ids.device).long()]
    return [value.moved(picked.expand(output_shape(node)), keeps_channels=False)]


def attention(walk: WalkContext, node: Node, inputs: list[ScaledValue | None]) -> list[ScaledValue | None]:
    """``scaled_dot_product_attention`` of a scaled value ``v`` ``(…, heads, S, E)`` (a scaled query or key
    changes the softmax): each output entry is a weighted sum over the sequence, degree unchanged."""
    if [i for i, v in enumerate(inputs) if v is not None] != [2]:
        raise walk.break_at(node, " as a query or key")
    value = inputs[2]
    assert value is not None
    ids = walk.reduce(node, value.ids, [value.ids.dim() - 2])
    shape = output_shape(node)
    if ids.dim() >= 3 and ids.shape[-3] < shape[-3] and shape[-3] % ids.shape[-3] == 0:
        # grouped-query attention (enable_gqa): each key/value head serves consecutive query heads
        ids = ids.repeat_interleave(shape[-3] // ids.shape[-3], dim=-3)
    return [ScaledValue(value.degree, ids.expand(shape), shift_free=False, channels_kept=False)]
