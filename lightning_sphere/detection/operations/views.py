"""Rules for views and concatenation: operations that only move entries (and so their channels).

The output's channel ids are the input's, moved as the operation moves entries; the degree is unchanged. Only a
squeeze, an unsqueeze or an expand keeps channel c of the tensor as output channel c of the layer.
"""

from __future__ import annotations

import torch
from torch.autograd.graph import Node

from lightning_sphere.detection.nodes import saved, signed
from lightning_sphere.detection.scaling import ScaledValue, WalkContext, first_scaled, output_shape, reshape_ids


def reshape(walk: WalkContext, node: Node, inputs: list[ScaledValue | None]) -> list[ScaledValue | None]:
    """``view``, ``reshape``, ``squeeze``, ``unsqueeze``, ``expand``: the output shape comes from the node's
    metadata."""
    value, op = first_scaled(inputs), node.name()
    out = output_shape(node)
    ids = value.ids.expand(out) if op == "ExpandBackward0" else reshape_ids(value.ids, out)
    return [value.moved(ids, keeps_channels=op.startswith(("Squeeze", "Unsqueeze", "Expand")))]


def permute(walk: WalkContext, node: Node, inputs: list[ScaledValue | None]) -> list[ScaledValue | None]:
    value = first_scaled(inputs)
    return [value.moved(value.ids.permute([signed(d) for d in saved(node, "_saved_dims")]), keeps_channels=False)]


def transpose(walk: WalkContext, node: Node, inputs: list[ScaledValue | None]) -> list[ScaledValue | None]:
    value = first_scaled(inputs)
    ids = value.ids.transpose(signed(saved(node, "_saved_dim0")), signed(saved(node, "_saved_dim1")))
    return [value.moved(ids, keeps_channels=False)]


def t(walk: WalkContext, node: Node, inputs: list[ScaledValue | None]) -> list[ScaledValue | None]:
    value = first_scaled(inputs)
    return [value.moved(value.ids.t(), keeps_channels=False)]


def roll(walk: WalkContext, node: Node, inputs: list[ScaledValue | None]) -> list[ScaledValue | None]:
    """``torch.roll``: entries shifted cyclically along some dimensions (all of them flattened when none given)."""
    value = first_scaled(inputs)
    shifts, dims = list(saved(node, "_saved_shifts")), [signed(d) for d in saved(node, "_saved_dims")]
    ids = value.ids.roll(shifts, dims) if dims else value.ids.flatten().roll(shifts).view(value.ids.shape)
    return [value.moved(ids, keeps_channels=False)]


def constant_pad(walk: WalkContext, node: Node, inputs: list[ScaledValue | None]) -> list[ScaledValue | None]:
    """``F.pad(x, pad, value=c)``: the padded entries are the constant, which does not scale (``-1``); a negative
    pad crops."""
    value = first_scaled(inputs)
    pad = list(saved(node, "_saved_pad"))
    ids = torch.nn.functional.pad(compact_for_pad(value.ids, len(pad) // 2), pad, value=-1)
    return [value.moved(ids.expand(output_shape(node)), keeps_channels=False, keeps_shift=False)]


def compact_for_pad(ids: torch.Tensor, padded: int) -> torch.Tensor:
    """``ids`` without broadcast dimensions except the last ``padded`` ones, which the pad changes."""
    index = tuple(
        slice(0, 1) if stride == 0 and d < ids.dim() - padded else slice(None) for d, stride in enumerate(ids.stride())
    )
    return ids[index]


def slice_(walk: WalkContext, node: Node, inputs: list[ScaledValue | None]) -> list[ScaledValue | None]:
    """``x[..., start:end:step, ...]`` along one dimension."""
    value = first_scaled(inputs)
    index = [slice(None)] * value.ids.dim()
    start, end = signed(saved(node, "_saved_start")), signed(saved(node, "_saved_end"))
    index[signed(saved(node, "_saved_dim"))] = slice(start, end, saved(node, "_saved_step"))
    return [value.moved(value.ids[tuple(index)], keeps_channels=False)]


def select(walk: WalkContext, node: Node, inputs: list[ScaledValue | None]) -> list[ScaledValue | None]:
    value = first_scaled(inputs)
    ids = value.ids.select(signed(saved(node, "_saved_dim")), signed(saved(node, "_saved_index")))
    return [value.moved(ids, keeps_channels=False)]


def split(walk: WalkContext, node: Node, inputs: list[ScaledValue | None]) -> list[ScaledValue | None]:
    """``split``, ``split_with_sizes``, ``unbind``: one output per part."""
    value, op = first_scaled(inputs), node.name()
    dim = signed(saved(node, "_saved_dim"))
    if op == "UnbindBackward0":
        parts = value.ids.unbind(dim)
    else:
        sizes = saved(node, "_saved_split_size") if op == "SplitBackward0" else list(saved(node, "_saved_split_sizes"))
        parts = value.ids.split(sizes, dim)
    return [value.moved(p, keeps_channels=False) for p in parts]


def cat(walk: WalkContext, node: Node, inputs: list[ScaledValue | None]) -> list[ScaledValue | None]:
    """``torch.cat``: the parts that scale must share one degree; those that do not hold ``-1``."""
    out = output_shape(node)
    dim = signed(saved(node, "_saved_dim")) % len(out)
    sizes: list[int | None] = []
    for (child, nr), value in zip(node.next_functions, inputs, strict=True):
        if value is not None:
            sizes.append(value.ids.shape[dim])
        elif child is not None:
            sizes.append(child._input_metadata[nr].shape[dim])
        else:
            sizes.append(None)
    unknown = [i for i, s in enumerate(sizes) if s is None]
    if len(unknown) > 1:
        raise walk.break_at(node)
    rest = out[dim] - sum(s for s in sizes if s is not None)  # the size of the one part not known, if any
    parts = []
    for size, value in zip([rest if s is None else s for s in sizes], inputs, strict=True):
        shape = list(out)
        shape[dim] = size
        parts.append(
            value.ids.expand(shape) if value is not None else torch.tensor(-1, dtype=torch.int32).expand(shape)
        )
    # dimensions broadcast in every part stay broadcast: concatenate one slice of them
    flat = [d for d in range(len(out)) if d != dim and all(p.stride(d) == 0 for p in parts)]
    index = tuple(slice(0, 1) if d in flat else slice(None) for d in range(len(out)))
    joined = torch.cat([p[index] for p in parts], dim).expand(out)
    present = [v for v in inputs if v is not None]
    degrees = {v.degree for v in present}
    if len(degrees) > 1:
        raise walk.break_at(node)
    return [
        ScaledValue(
            degrees.pop(),
            joined,
            statistic=all(v.statistic for v in present),
            shift_free=all(v.shift_free for v in present),
            channels_kept=False,
        )
    ]
