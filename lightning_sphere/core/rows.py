"""The rows of several modules' parameters and the groups they form: per-group math batched over all of them."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_sphere.core.groups import InvariantGroups
from lightning_sphere.core.sharding import group_sum_for


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
        added up over the ranks (one collective, :class:`~lightning_sphere.core.sharding.GroupSum`)."""
        rows = torch.cat(list(per_row))
        sums = rows.new_zeros(self.num_groups, rows.shape[1]).index_add_(0, self.group_of_row, rows)
        return sums if self.group_sum is None else self.group_sum(sums)

    def spread(self, per_group: Tensor) -> list[Tensor]:
        """A per-group vector ``(M,)`` as one column ``(C, 1)`` per slice, against its rows."""
        return list(per_group[self.group_of_row][:, None].split(self.rows_per_slice))

    def per_module(self, values: Sequence[float], dtype: torch.dtype = torch.float64) -> Tensor:
        """One value per module, repeated over its groups: ``(M,)`` on the index's device."""
        return torch.tensor(values, dtype=dtype).to(self.group_of_row.device)[self.module_of_group]


def math_dtype(t: Tensor) -> torch.dtype:
    """float32 at least; float64 stays float64."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
