"""Rules for the fused normalizations: ``layer_norm``, ``group_norm`` and ``batch_norm`` nodes.

Each cancels the scale of the set of entries it normalizes together, which must all scale, and ties their
channels. It cancels a per-channel shift too (the layer's bias) when each set holds one channel and nothing on the
way broke the shift.
"""

from __future__ import annotations

import math

from torch.autograd.graph import Node
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_sphere.detection.nodes import saved
from lightning_sphere.detection.scaling import (
    NormReached,
    ScaleBroken,
    ScaledValue,
    WalkContext,
    compact,
    mixes_scaling,
    reshape_ids,
    rows,
    sole_input,
)


def layer_norm(walk: WalkContext, node: Node, inputs: list[ScaledValue | None]) -> list[ScaledValue | None]:
    """Normalizes over the last ``len(normalized_shape)`` dimensions."""
    value = sole_input(walk, node, inputs)
    n = len(saved(node, "_saved_normalized_shape"))
    return _normalize(walk, node, value, list(range(value.ids.dim() - n, value.ids.dim())), fused=False)


def group_norm(walk: WalkContext, node: Node, inputs: list[ScaledValue | None]) -> list[ScaledValue | None]:
    """Normalizes each of ``group`` consecutive sets of channels of each sample, as ``(N, group, -1)``."""
    value = sole_input(walk, node, inputs)
    if value.offset is not None:  # it subtracts each group's mean, not each channel's
        raise ScaleBroken(f"output reaches {value.offset_at}, whose bias {walk.where(node)} does not cancel")
    grouped = ScaledValue(value.degree, reshape_ids(value.ids, (value.ids.shape[0], saved(node, "_saved_group"), -1)))
    grouped.shift_free, grouped.channels_kept = value.shift_free, False
    return _normalize(walk, node, grouped, [2], fused=False)


def batch_norm(walk: WalkContext, node: Node, inputs: list[ScaledValue | None]) -> list[ScaledValue | None]:
    """Normalizes each channel (dim 1) over the batch and the spatial dimensions: only with the batch's own
    statistics (training mode); running statistics do not cancel the scale."""
    value = sole_input(walk, node, inputs)
    if not _batch_statistics(walk, node):
        call = walk.namer(node)
        what = f"{call.name} ({type(call.module).__name__})" if call else "a batch norm"
        raise ScaleBroken(f"{what} uses running statistics (eval mode)")
    dims = [d for d in range(value.ids.dim()) if d != 1]
    return _normalize(walk, node, value, dims, fused=True, cancels_offset=True)


def _normalize(
    walk: WalkContext, node: Node, value: ScaledValue, dims: list[int], fused: bool, cancels_offset: bool = False
) -> list[ScaledValue | None]:
    """A fused normalization over ``dims`` of its input: the channels in each normalized set tie.
    ``cancels_offset``: it subtracts each dim-1 channel's mean, which cancels a bias on the way."""
    if value.offset is not None and not cancels_offset:
        raise ScaleBroken(f"output reaches {value.offset_at}, whose bias {walk.where(node)} does not cancel")
    ids = value.ids
    row_ids = rows(compact(ids), [d for d in range(ids.dim()) if d not in dims])
    if mixes_scaling(row_ids):
        raise ScaleBroken(f"output is normalized by {walk.where(node)} together with values that do not scale with it")
    single = bool((row_ids.amax(1) == row_ids.amin(1)).all())
    walk.ties.tie(row_ids)
    kept = value.channels_kept
    walk.norms.append(
        NormReached(
            node,
            cancels_shift=value.shift_free and single,
            fused_channel_norm=fused,
            channels_kept=kept,
            count=math.prod(ids.shape[d] for d in dims),
        )
    )
    return [None]


def _batch_statistics(walk: WalkContext, node: Node) -> bool:
    """Whether a batch norm node normalized with the statistics of its input. The native node says so;
    cuDNN's does not save it: then its module's mode, or the batch statistics it saved, tell."""
    training = getattr(node, "_saved_training", None)
    if training is not None:
        return bool(training)
    call = walk.namer(node)
    if call is not None and isinstance(call.module, _BatchNorm):
        return call.training or not call.module.track_running_stats
    saved = getattr(node, "_saved_result1", None)
    return saved is not None and saved.numel() > 0
