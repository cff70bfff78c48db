"""The channels of a layer that its walks leave invariant, and the rows of its parameters that hold them.

:func:`walk_parts` walks the scale of a layer's channels from each of its starts (its calls' outputs, or its
weight), all channels at once and, where the graph parts them (``q, k, v = qkv.chunk(3)``) and some reach the
loss, each part alone; :func:`kept_channels` and :func:`group_size` read which channels stay invariant and how
they group; :func:`rows_slice` and :func:`companion_slice` say which rows of the weight, its bias and a bias built
on the spot (:meth:`~lightning_sphere.detection.walk.ScalingWalk.add_bias`) hold them (docs/theory.md §1.3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.autograd.graph import Node

from lightning_sphere.core.groups import ParamSlice
from lightning_sphere.detection.recorder import _Graph, _NormNamer
from lightning_sphere.detection.scaling import ChannelTies, NormReached, compact
from lightning_sphere.detection.walk import ScalingWalk


def weight_uses(walk: ScalingWalk, leaf: Node, graph: _Graph) -> str:
    """Why a weight followed through all its uses is not invariant, naming the uses when there are several (a
    weight tied to another layer's: an embedding and a language model's output layer)."""
    users = graph.consumers.get(leaf, [])
    if not walk.reason or len(users) < 2:
        return walk.reason
    named = ", ".join(dict.fromkeys(walk.where(u) for u in sorted(users, key=lambda u: u._sequence_nr())))
    return f"weight used {len(users)} times ({named}): {walk.reason}"


def companion_slice(
    names: dict[nn.Parameter, str],
    param: Tensor,
    joined: dict[int, int],
    kept: set[int],
    rows: tuple[int, int] | None,
    split: int,
) -> ParamSlice | str | None:
    """The rows of a bias parameter whose entries were added to the layer's ``kept`` channels (``joined``: entry
    → channel, -1 where the column does not scale), when they line up with the weight's rows (``rows`` of each
    of ``split`` runs, as :func:`rows_slice`): one offset between entry and channel for all of them, and no
    entry of those rows added to another column (entries added nowhere, zeroed on the way, change nothing when
    scaled). ``None``: none added to those channels."""
    inside = {e: c for e, c in joined.items() if c in kept}
    if not inside:
        return None
    if not isinstance(param, nn.Parameter) or param not in names:
        return "a bias added to its rows is computed from a tensor that is no parameter of the model"
    name = names[param]
    offsets = {c - e for e, c in inside.items()}
    shift = min(offsets)
    low, high = (rows or (0, max(kept) + 1))[0] - shift, (rows or (0, max(kept) + 1))[1] - shift
    size = param.shape[0] if param.dim() == 1 else -1
    if len(offsets) > 1 or size < 0 or low < 0 or high > size or (split > 1 and (shift or size % split)):
        return f"bias `{name}` is added to its channels out of order, which is not followed"
    taken = {e for e in range(size) if low <= e % (size // split) < high} if split > 1 else set(range(low, high))
    if any(e in taken and c not in kept for e, c in joined.items()):
        return f"bias `{name}` is added to its channels and to others"
    if (rows is None or split == 1) and (low, high) == (0, size):  # all of it: the parameter, not a slice
        return ParamSlice(names[param], param)
    return rows_slice(names[param], param, (low, high), split)


def group_size(ties: ChannelTies, order: Sequence[int]) -> int:
    """The smallest run of consecutive channels of ``order`` (the channels in the groups, in the order the
    groups take them), dividing their count, that holds every tied set among them whole."""
    count = len(order)
    roots = [ties.find(c) for c in order]
    for size in range(1, count + 1):
        if count % size:
            continue
        block: dict[int, int] = {}
        if all(block.setdefault(r, i // size) == i // size for i, r in enumerate(roots)):
            return size
    return count


def kept_channels(ties: ChannelTies, channels: int, broken: set[int]) -> tuple[int, int, int] | None:
    """The channels whose scale never reaches the loss, ``(first, stop, period)``: the channels
    ``first:stop`` of every run of ``period`` (the q and k rows of a fused qkv projection, one run; those of
    each head of a head-major ``[q_h, k_h, v_h]`` layout, one per head), at least two of them, none tied to a
    broken one; else ``None``."""
    fine = _fine(ties, channels, broken)
    if len(fine) < 2:
        return None
    for period in [p for p in range(1, channels + 1) if channels % p == 0]:
        first = [c for c in fine if c < period]
        if not first or first[-1] - first[0] + 1 != len(first):
            continue
        if fine == [k * period + c for k in range(channels // period) for c in first]:
            return first[0], first[-1] + 1, period
    return None


def align_companions(
    ties: ChannelTies, channels: int, broken: set[int], companions: dict[Tensor, dict[int, int]]
) -> set[int]:
    """``broken``, widened so that each bias built on the spot covers all the kept channels or none: every group
    holds the same parameters. EVA's ``cat((q_bias, k_bias, v_bias))`` with ``k_bias`` a zero buffer leaves the q
    and k rows invariant, but only the q rows have a parameter bias: keep the larger of the channels a bias covers
    and those it does not (the covered ones when equal)."""
    for param, joined in companions.items():
        fine = set(_fine(ties, channels, broken))
        covered = {c for c in joined.values() if c in fine}
        shifts = {c - e for e, c in joined.items() if c in covered}
        if len(shifts) == 1 and param.dim() == 1:  # an entry added nowhere (zeroed on the way) may sit in the slice
            shift = shifts.pop()
            covered |= {c for c in fine if 0 <= c - shift < param.shape[0] and joined.get(c - shift, c) == c}
        if not covered or covered == fine:
            continue
        options = [broken | (fine - covered), broken | covered]
        sizes = [_kept_size(ties, channels, option) for option in options]
        broken = options[0] if sizes[0] >= sizes[1] else options[1]
    return broken


def _fine(ties: ChannelTies, channels: int, broken: set[int]) -> list[int]:
    """The channels tied to no ``broken`` one, in order."""
    lost = {ties.find(c) for c in broken}
    return [c for c in range(channels) if ties.find(c) not in lost]


def _kept_size(ties: ChannelTies, channels: int, broken: set[int]) -> int:
    kept = kept_channels(ties, channels, broken)
    return 0 if kept is None else (kept[1] - kept[0]) * (channels // kept[2])


def scattered(ties: ChannelTies, channels: int, broken: set[int]) -> str:
    """What to add to the reason a layer is left out when some of its channels are invariant but
    :func:`kept_channels` cannot hold them (they are not one run, nor the same run of every head)."""
    fine = len(_fine(ties, channels, broken))
    if not fine:
        return ""
    return (
        f"; its other {fine} of {channels} channels are invariant, but do not form one run of channels (or the "
        "same run in every head), which its groups cannot hold"
    )


def rows_slice(name: str, param: nn.Parameter, rows: tuple[int, int] | None, split: int) -> ParamSlice:
    """``param``'s rows ``rows`` of dim 0 (all: ``None``), or of every one of ``split`` runs of dim 0."""
    if rows is None:
        return ParamSlice(name, param)
    if split == 1:
        return ParamSlice(name, param, channels=rows)
    return ParamSlice(name, param, (0, 1), split, channels=rows)


@dataclass
class Walked:
    """What the walks from a layer's starts found (:func:`walk_parts`)."""

    ties: ChannelTies
    norms: list[NormReached] = field(default_factory=list)
    broken: set[int] = field(default_factory=set)
    reasons: list[str] = field(default_factory=list)
    companions: dict[Tensor, dict[int, int]] = field(default_factory=dict)
    parts: list[set[int]] = field(default_factory=list)


def walk_parts(starts: Sequence[tuple[Node, Tensor]], graph: _Graph, namer: _NormNamer, channels: int) -> Walked:
    """Walk from every start (a call's output, or the weight) with all the layer's channels scaled; where some
    reach the loss and the graph parts the channels on the way (``q, k, v = qkv.chunk(3)``), walk again with
    the channels of each part alone, and keep that when more channels come out invariant.

    One degree per value cannot say how a product of two parts scales (ReLU linear attention's ``kᵀ v``, with
    v padded by ones), and the whole walk breaks there; scaled alone, each part keeps one degree. Invariance
    to each part's scaling alone makes the layer invariant to them together (docs/theory.md §1.3)."""
    whole = _walk(starts, graph, namer, ChannelTies(channels), None)
    if not whole.broken or not whole.parts:
        return whole
    rest = set(range(channels)).difference(*whole.parts)
    shared = ChannelTies(channels)
    alone = [_walk(starts, graph, namer, shared, part) for part in [*whole.parts, rest] if part]
    combined = Walked(shared)
    for walked in alone:
        combined.norms += walked.norms
        combined.broken |= walked.broken
        combined.reasons += walked.reasons
        for param, joined in walked.companions.items():
            combined.companions.setdefault(param, {}).update(joined)
    if _invariant_count(combined, channels) > _invariant_count(whole, channels):
        return combined
    whole.reasons = combined.reasons + whole.reasons  # each part's own break says more than where parts meet
    return whole


def _invariant_count(walked: Walked, channels: int) -> int:
    lost = {walked.ties.find(c) for c in walked.broken}
    return sum(walked.ties.find(c) not in lost for c in range(channels)) if walked.norms else 0


def _walk(
    starts: Sequence[tuple[Node, Tensor]], graph: _Graph, namer: _NormNamer, ties: ChannelTies, part: set[int] | None
) -> Walked:
    """One walk per start, all channels scaled, or those of ``part`` alone (the others as if constant)."""
    walked = Walked(ties)
    for node, ids in starts:
        if part is not None:
            small = compact(ids)
            inside = torch.isin(small, torch.tensor(sorted(part), dtype=small.dtype))
            ids = torch.where(inside, small, torch.tensor(-1, dtype=small.dtype)).expand(ids.shape)
        walk = ScalingWalk(graph, ties, namer)
        walked.norms += walk.run(node, ids)
        walked.broken |= walk.broken
        walked.reasons.append(weight_uses(walk, node, graph) if hasattr(node, "variable") else walk.reason)
        for param, joined in walk.companions.items():
            walked.companions.setdefault(param, {}).update(joined)
        walked.parts = walked.parts or walk.parts
    return walked
