"""Which tensors form radially invariant groups (docs/theory.md §1): the vocabulary every stage shares.

An :class:`InvariantGroups` entry describes one module: its parameters, cut into ``num_groups``
groups of ``group_size`` entries each (one group per output channel after BatchNorm, one per channel group
after GroupNorm, the whole layer after LayerNorm, …). Each parameter's share is a
:class:`ParamSlice`: the dimensions of the tensor that index output channels. Seen as one row per
output channel (a view for contiguous and channels_last weights), per-group sums are row sums added up
over the rows of each group (:class:`~lightning_sphere.core.rows.RowIndex`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from torch import Tensor, nn

from lightning_sphere.core.sharding import local, sharded_rows


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
            the q and k rows of a fused qkv projection, say; with ``split`` and ``channel_dims=(0, 1)``, the rows
            ``start:stop`` of each of the ``split`` runs of dimension 0 (the q and k rows of each head of a
            head-major ``[q_h, k_h, v_h]`` layout); ``None``: all of them.

    Raises:
        ValueError: for a channel range with other channel dimensions than ``(0,)`` (``(0, 1)`` with a split),
            or out of bounds.
    """

    name: str
    param: nn.Parameter
    channel_dims: tuple[int, ...] = (0,)
    split: int = 1
    channels: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.channels is not None:
            start, stop = self.channels
            runs = self.param.shape[0] // self.split if self.param.dim() else 0
            dims = (0,) if self.split == 1 else (0, 1)
            if self.channel_dims != dims or not 0 <= start < stop <= runs or runs * self.split != self.param.shape[0]:
                raise ValueError(
                    f"{self.name}: channels {self.channels} must be a range of the rows of dim 0"
                    + (f" (of each of its {self.split} runs)" if self.split > 1 else "")
                )

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
        shaped = t.unflatten(0, (self.split, -1)) if self.split > 1 else t
        if self.channels is not None:
            rows = slice(*self.channels)
            return shaped[:, rows] if self.split > 1 else shaped[rows]  # of each run, if split
        return shaped

    @cached_property
    def _shard(self) -> tuple[int, int] | None:
        """The rows of dim 0 this rank holds when the parameter is sharded on it (FSDP2), else ``None``."""
        shard = sharded_rows(self.param)
        if shard is not None and (self.split > 1 or (0 in self.channel_dims and self.channel_dims != (0,))):
            raise ValueError(
                f"{self.name}: its output channels are laid out across dim 0 in a way a shard of dim 0 cuts "
                "(a grouped ConvTranspose, the rows of each head); FSDP2 cannot shard it for SphereMonitor: leave it "
                "out of fully_shard"
            )
        return shard

    @cached_property
    def _local_kept(self) -> tuple[int, int, range]:
        """Sharded parameters: the local rows of dim 0 that belong to the groups (start, stop) and the global
        channel index of each local row of :meth:`rows`."""
        assert self._shard is not None  # only asked of sharded parameters
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
        runs = (self.split, shape[0] // self.split) if self.split > 1 else (shape[0],)
        if self.channels is not None:
            runs = (*runs[:-1], self.channels[1] - self.channels[0])
        return (*runs, *shape[1:])

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
        strides = shaped.stride()
        others = sorted((d for d in range(shaped.dim()) if d not in self.channel_dims), key=lambda d: -strides[d])
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
        granularity: ``"channel"``, ``"layer"`` or ``"<k> channels"`` (an embedding's: ``"row"``, ``"<k> rows"``).
        cosine: ``max |cos(g, x)|`` over the groups when verified, ``None`` before.
        channels_aligned: the normalization normalizes each output channel where it is (channel c of the
            norm is output channel c, nothing on the way moves channels): its running statistics, if it keeps
            any, are one per group.
        norm_count: the fewest values one of its normalizations normalized together on the batch it was found
            on (batch × spatial size for a BatchNorm); ``None`` when not known (a normalization written by hand).
        unknown_eps: where a normalization written by hand adds a constant of unknown size to what it divides by
            (``q·Σk + eps``), if one does: only the gradient test says it is small, as strictly as for a numeric
            candidate (docs/theory.md §1.3).
    """

    module_name: str
    slices: tuple[ParamSlice, ...]
    num_groups: int
    norm_name: str
    norm_type: str
    granularity: str = "channel"
    cosine: float | None = None
    channels_aligned: bool = False
    norm_count: int | None = None
    unknown_eps: str = ""

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


@dataclass(frozen=True, eq=False)
class Stepped:
    """A tracked module as an optimizer steps it: its groups, and the optimizer param group of each of its
    slices (in the order of ``entry.slices``)."""

    entry: InvariantGroups
    param_groups: tuple[dict[str, Any], ...]


#: Why a module whose parameters no optimizer steps is not tracked.
UNOPTIMIZED = "not stepped by any optimizer"
