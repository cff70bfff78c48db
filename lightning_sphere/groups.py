"""Which tensors form radially invariant groups, and whether they really are (docs/theory.md §1).

An :class:`InvariantGroups` entry describes one module: its parameters, cut into ``num_groups``
groups of ``group_size`` entries each (one group per output channel after BatchNorm, one per channel group
after GroupNorm, the whole layer after LayerNorm, …). Each parameter's share is a
:class:`ParamSlice`: the dimensions of the tensor that index output channels. Seen as one row per
output channel (a view for contiguous and channels_last weights), per-group sums are row sums added up
over the rows of each group.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sphere.distributed import group_sum_for, local, sharded_rows

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


@dataclass(frozen=True, eq=False)
class ParamSlice:
    """One parameter's share of its module's groups.

    Args:
        name: qualified parameter name, as in ``model.named_parameters()``.
        param: the parameter.
        channel_dims: the dimensions that index the module's output channels, outermost first (after
            ``split``); empty when the whole tensor is one channel.
        split: if above 1, dimension 0 is first unflattened into ``(split, -1)``: the layout of a
            grouped ConvTranspose weight, whose output channel is ``(group, dim 1)``.
        channels: ``(start, stop)``: only these output channels (rows of dimension 0) belong to the groups,
            the q and k rows of a fused qkv projection, say; ``None``: all of them.

    Raises:
        ValueError: for a channel range with other channel dimensions than ``(0,)``, or out of bounds.
    """

    name: str
    param: nn.Parameter
    channel_dims: tuple[int, ...] = (0,)
    split: int = 1
    channels: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.channels is not None:
            start, stop = self.channels
            if self.channel_dims != (0,) or self.split != 1 or not 0 <= start < stop <= self.param.shape[0]:
                raise ValueError(f"{self.name}: channels {self.channels} must be a range of the rows of dim 0")

    def __repr__(self) -> str:  # the parameter by name and shape, not its values
        extras = "".join(
            f", {name}={value!r}"
            for name, value, default in (
                ("channel_dims", self.channel_dims, (0,)),
                ("split", self.split, 1),
                ("channels", self.channels, None),
            )
            if value != default
        )
        shape = "×".join(map(str, self.param.shape)) or "scalar"
        return f"ParamSlice({self.name!r}, {shape} {str(self.param.dtype).removeprefix('torch.')}{extras})"

    def _shaped(self, t: Tensor) -> Tensor:
        if self.channels is not None:
            return t[self.channels[0] : self.channels[1]]
        return t.unflatten(0, (self.split, -1)) if self.split > 1 else t

    @cached_property
    def _shard(self) -> tuple[int, int] | None:
        """The rows of dim 0 this rank holds when the parameter is sharded on it (FSDP2), else ``None``."""
        shard = sharded_rows(self.param)
        if shard is not None and (self.split > 1 or (0 in self.channel_dims and self.channel_dims != (0,))):
            raise ValueError(
                f"{self.name}: its output channels are laid out across dim 0 in a way a shard of dim 0 cuts "
                "(a grouped ConvTranspose); FSDP2 cannot shard it for SphereMonitor: leave it out of fully_shard"
            )
        return shard

    @cached_property
    def _local_kept(self) -> tuple[int, int, range]:
        """Sharded parameters: the local rows of dim 0 that belong to the groups (start, stop) and the global
        channel index of each local row of :meth:`rows`."""
        offset, count = self._shard
        if self.channel_dims != (0,):  # every local row holds a part of every channel (or of the one)
            return 0, count, range(self.num_channels)
        start, stop = self.channels or (0, self.param.shape[0])
        first, last = max(start, offset), max(min(stop, offset + count), max(start, offset))
        return first - offset, last - offset, range(first - start, last - start)

    def _local_shaped(self, t: Tensor) -> Tensor:
        """``t``'s local shard, shaped as :meth:`_shaped` shapes the whole tensor (a plain tensor given for a
        sharded parameter is taken to be its local shard already)."""
        t = local(t)
        if self._shard is None:
            return self._shaped(t)
        start, stop, _ = self._local_kept
        return t[start:stop] if self.channel_dims == (0,) else t

    @property
    def local_channels(self) -> range:
        """The output channel of each row :meth:`rows` returns: all of them, unless the parameter is sharded
        on dim 0 (FSDP2), where they are the channels of the rows this rank holds (possibly none)."""
        return range(self.num_channels) if self._shard is None else self._local_kept[2]

    @property
    def _shape(self) -> tuple[int, ...]:
        """The shape of :meth:`_shaped` of the whole parameter, from shapes alone (a sharded parameter is not
        sliced: that would gather it)."""
        shape = tuple(self.param.shape)
        if self.channels is not None:
            return (self.channels[1] - self.channels[0], *shape[1:])
        return (self.split, shape[0] // self.split, *shape[1:]) if self.split > 1 else shape

    @property
    def num_channels(self) -> int:
        return math.prod(self._shape[d] for d in self.channel_dims)

    @property
    def numel(self) -> int:
        """Entries of the parameter that belong to the groups."""
        return math.prod(self._shape)

    def rows(self, t: Tensor) -> Tensor:
        """``t`` (shaped like the parameter) as one row per output channel, ``(C, n)``.

        A view whenever the layout allows (contiguous and channels_last weights): the entries of a row
        come in the parameter's memory order, the same for every tensor, so per-row sums are unchanged.
        Otherwise a copy; :meth:`write_rows` then puts updated rows back.
        """
        shaped = self._local_shaped(t)
        width = math.prod(n for d, n in enumerate(shaped.shape) if d not in self.channel_dims)
        return shaped.permute(self._row_order()).reshape(len(self.local_channels), width)

    def write_rows(self, t: Tensor, rows: Tensor) -> None:
        """Copy ``rows`` (from :meth:`rows`) into ``t``, unless they are a view of it already."""
        t = local(t)
        if rows.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
            target = self._local_shaped(t).permute(self._row_order())
            target.copy_(rows.view(target.shape))

    def _row_order(self) -> list[int]:
        shaped = self._local_shaped(self.param)
        others = sorted((d for d in range(shaped.dim()) if d not in self.channel_dims), key=lambda d: -shaped.stride(d))
        return [*self.channel_dims, *others]


@dataclass(frozen=True, eq=False)
class InvariantGroups:
    """The radially invariant groups of one module.

    Attributes:
        module_name: the module's name in ``model.named_modules()``.
        slices: the parameters involved and how they split into groups.
        num_groups: number of groups; each holds :attr:`group_size` entries.
        norm_name: name of the normalization module that makes the groups invariant.
        norm_type: its class name (``"BatchNorm2d"``, …).
        granularity: ``"channel"``, ``"layer"`` or ``"<k> channels"``.
        cosine: ``max |cos(g, x)|`` over the groups when verified, ``None`` before.
        channels_aligned: the normalization normalizes each output channel where it is (channel c of the
            norm is output channel c, nothing on the way moves channels): its running statistics, if it keeps
            any, are one per group.
    """

    module_name: str
    slices: tuple[ParamSlice, ...]
    num_groups: int
    norm_name: str
    norm_type: str
    granularity: str = "channel"
    cosine: float | None = None
    channels_aligned: bool = False

    @property
    def params(self) -> tuple[nn.Parameter, ...]:
        return tuple(s.param for s in self.slices)

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.slices)

    @property
    def group_size(self) -> int:
        """Size ``d`` of one group: the entries it holds."""
        return self.numel // self.num_groups

    def __post_init__(self) -> None:
        for s in self.slices:
            if s.num_channels % self.num_groups:
                raise ValueError(
                    f"{s.name} has {s.num_channels} output channels, which do not split into "
                    f"{self.num_groups} groups of {self.module_name}"
                )

    def __repr__(self) -> str:  # the dataclass's would print every weight
        return (
            f"InvariantGroups({self.module_name!r}, params={[s.name for s in self.slices]}, "
            f"num_groups={self.num_groups}, group_size={self.group_size}, norm={self.norm_name!r} "
            f"({self.norm_type}), granularity={self.granularity!r}, cosine={self.cosine})"
        )


class RowIndex:
    """The rows of several modules' parameters and the groups they form, for per-group math batched over
    all of them: one ``index_add`` turns per-row sums into per-group sums.

    Rows are every :class:`ParamSlice`'s :meth:`~ParamSlice.rows`, slice after slice, module after module;
    groups are numbered module after module. Measurement and correction share one index per optimizer
    (a correction algorithm gets its modules' part, :meth:`select`).

    Args:
        entries: the modules.
        device: where the per-row group ids live (the parameters' device).
    """

    def __init__(self, entries: Sequence[InvariantGroups], device: torch.device) -> None:
        self.entries, self.device = tuple(entries), device
        self.slices = tuple(s for entry in self.entries for s in entry.slices)
        #: rows of each slice (on this rank, for parameters FSDP2 shards)
        self.rows_per_slice = [len(s.local_channels) for s in self.slices]
        #: adds up per-group sums over the ranks when parameters are sharded (FSDP2), else ``None``
        self.group_sum = group_sum_for(s.param for s in self.slices)
        #: each module's groups, as a range of group ids
        self.groups: list[slice] = []
        group_of_row, start = [], 0
        for entry in self.entries:
            self.groups.append(slice(start, start + entry.num_groups))
            group_of_row += [
                start + torch.tensor(s.local_channels, dtype=torch.long) // (s.num_channels // entry.num_groups)
                for s in entry.slices
            ]
            start += entry.num_groups
        self.num_groups = start
        #: ``(R,)``: the group id of every row
        self.group_of_row = (torch.cat(group_of_row) if group_of_row else torch.zeros(0, dtype=torch.long)).to(device)
        sizes = torch.tensor([entry.num_groups for entry in self.entries], dtype=torch.long)
        #: ``(M,)``: the module (index into ``entries``) of every group
        self.module_of_group = torch.repeat_interleave(torch.arange(len(self.entries)), sizes).to(device)

    def select(self, start: int, stop: int) -> RowIndex:
        """Modules ``start:stop`` as an index of their own, cut from this one (no rebuild)."""
        part = copy.copy(self)
        first, count = (
            sum(len(e.slices) for e in self.entries[:start]),
            sum(len(e.slices) for e in self.entries[start:stop]),
        )
        rows = slice(sum(self.rows_per_slice[:first]), sum(self.rows_per_slice[: first + count]))
        groups = slice(self.groups[start].start, self.groups[stop - 1].stop)
        part.entries, part.slices = self.entries[start:stop], self.slices[first : first + count]
        part.rows_per_slice = self.rows_per_slice[first : first + count]
        part.groups = [slice(g.start - groups.start, g.stop - groups.start) for g in self.groups[start:stop]]
        part.num_groups = groups.stop - groups.start
        part.group_of_row = self.group_of_row[rows] - groups.start
        part.module_of_group = self.module_of_group[groups] - start
        return part

    def sum_rows(self, per_row: Sequence[Tensor]) -> Tensor:
        """Per-group sums ``(M, k)`` of per-row sums ``(C, k)``, one tensor per slice; for sharded parameters,
        added up over the ranks (one collective, :class:`~lightning_sphere.distributed.GroupSum`)."""
        rows = torch.cat(list(per_row))
        sums = rows.new_zeros(self.num_groups, rows.shape[1]).index_add_(0, self.group_of_row, rows)
        return sums if self.group_sum is None else self.group_sum(sums)

    def spread(self, per_group: Tensor) -> list[Tensor]:
        """A per-group vector ``(M,)`` as one column ``(C, 1)`` per slice, against its rows."""
        return list(per_group[self.group_of_row][:, None].split(self.rows_per_slice))

    def per_module(self, values: Sequence[float], dtype: torch.dtype = torch.float64) -> Tensor:
        """One value per module, repeated over its groups: ``(M,)`` on the index's device."""
        return torch.tensor(values, dtype=dtype).to(self.group_of_row.device)[self.module_of_group]


def tolerance_for(
    entry: InvariantGroups, tolerance: float | None = None, compute_dtype: torch.dtype | None = None
) -> float:
    """The largest max |cos(g, x)| over ``entry``'s groups that passes the gradient test: δ/√d, δ the
    ``tolerance`` (``None``: :data:`COSINE_TOLERANCE`, or :data:`NUMERIC_TOLERANCE` for numeric candidates),
    and at least the round-off :func:`noise_floor` of its weights' dtype and of ``compute_dtype``."""
    if tolerance is None:
        tolerance = NUMERIC_TOLERANCE if entry.norm_type == GRADIENT_TEST else COSINE_TOLERANCE
    floor = max(noise_floor(d) for d in (entry.slices[0].param.dtype, compute_dtype or torch.float32))
    return max(tolerance * random_cosine(entry.group_size), floor)


def indistinct(entry: InvariantGroups, compute_dtype: torch.dtype | None = None) -> bool:
    """Whether round-off alone reaches half of what a random direction shows: the gradient test cannot
    tell an invariant group from another (large groups with 16-bit gradients)."""
    floor = max(noise_floor(d) for d in (entry.slices[0].param.dtype, compute_dtype or torch.float32))
    return floor >= random_cosine(entry.group_size) / 2


@torch.no_grad()
def gradient_cosines(groups: Sequence[InvariantGroups], grads: Mapping[nn.Parameter, Tensor]) -> list[float | None]:
    """``max |cos(g, x)|`` over each module's groups, from the current weights and ``grads`` (§1 test).

    Groups with a zero gradient are left out; a module is ``None`` when none of its groups has a finite,
    non-zero gradient (it cannot be judged on this step). One device-to-host transfer for all modules.
    """
    if not groups:
        return []
    index = RowIndex(groups, groups[0].slices[0].param.device)
    per_row = []
    for s in index.slices:
        x = s.rows(s.param.detach()).to(math_dtype(s.param))
        g = s.rows(grads[s.param]).to(x.dtype)
        per_row.append(torch.stack([(x * g).sum(1), (x * x).sum(1), (g * g).sum(1)], 1).double())
    xg, xx, gg = index.sum_rows(per_row).unbind(1)
    cos = (xg / (xx * gg).sqrt()).abs()
    judged = (gg > 0) & cos.isfinite()
    modules, segment = len(index.entries), index.module_of_group

    def per_module(values: Tensor, how: str, initial: float) -> Tensor:
        return values.new_full((modules,), initial).scatter_reduce_(0, segment, values, how)

    worst = per_module(torch.where(judged, cos, 0), "amax", 0.0)
    usable = (per_module(gg.isfinite().double(), "amin", 1.0) > 0) & (per_module(judged.double(), "amax", 0.0) > 0)
    return [None if v < 0 else v for v in torch.where(usable, worst, -1).cpu().tolist()]


def math_dtype(t: Tensor) -> torch.dtype:
    """float32 at least; float64 stays float64."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def verify(
    groups: Iterable[InvariantGroups],
    grads: Mapping[nn.Parameter, Tensor],
    tolerance: float | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[list[InvariantGroups], list[InvariantGroups], list[InvariantGroups]]:
    """Split candidates into (accepted, rejected, undecided) by the gradient-orthogonality test of §1.

    A module passes while max |cos(g, x)| over its groups is within :func:`tolerance_for` (δ/√d, d the
    group size). Accepted and rejected entries carry their measured ``cosine``; undecided ones had no usable
    gradient on this step (missing, zero or not finite) and should be tried again on a later one. Where the
    test cannot tell (:func:`indistinct`), a candidate the structure vouches for is accepted and a numeric
    one rejected.
    """
    candidates, waiting = [], []
    for entry in groups:
        (candidates if all(p in grads for p in entry.params) else waiting).append(entry)
    accepted, rejected = [], []
    for entry, cos in zip(candidates, gradient_cosines(candidates, grads), strict=True):
        if cos is None:
            waiting.append(entry)
        elif cos <= tolerance_for(entry, tolerance, compute_dtype) or (
            indistinct(entry, compute_dtype) and entry.norm_type != GRADIENT_TEST
        ):
            accepted.append(replace(entry, cosine=cos))
        else:
            rejected.append(replace(entry, cosine=cos))
    return accepted, rejected, waiting


@dataclass(frozen=True, eq=False)
class Stepped:
    """A tracked module as an optimizer steps it: its groups, and the optimizer param group of each of its
    slices (in the order of ``entry.slices``)."""

    entry: InvariantGroups
    param_groups: tuple[dict[str, Any], ...]
