"""The table of tracked groups printed at the start of training."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from torch import nn

from lightning_sphere.core.groups import InvariantGroups
from lightning_sphere.core.names import model_order, position


class _Column(NamedTuple):
    header: str
    cell: Callable[[InvariantGroups], str]
    numeric: bool  # right-aligned


_COLUMNS = (
    _Column("module", lambda g: g.module_name, False),
    _Column("granularity", lambda g: g.granularity, False),
    _Column("groups", lambda g: f"{g.num_groups:,}", True),
    _Column("d", lambda g: f"{g.group_size:,}", True),
    _Column("normalization", lambda g: f"{g.norm_name} ({g.norm_type})" if g.norm_name else g.norm_type, False),
    _Column("max|cos(g,x)|", lambda g: "-" if g.cosine is None else f"{g.cosine:.1e}", True),
)


def summarize(
    groups: Sequence[InvariantGroups],
    model: nn.Module,
    untracked: Mapping[str, str] | None = None,
    corrections: Mapping[str, str] | None = None,
) -> str:
    """A text table: one row per tracked module, the tracked share of the trainable parameters, and
    every module left out with the reason, in model order (``named_modules()``).

    Args:
        groups: the tracked modules.
        model: the model they belong to, for the count of trainable parameters.
        untracked: module name → why it is not tracked; by default, when ``groups`` is what
            :func:`~lightning_sphere.find_invariant_groups` returned, its ``rejected``.
        corrections: module name → the algorithm its spherical correction makes it follow; adds a column.
    """
    if untracked is None:
        untracked = getattr(groups, "rejected", None)
    order = model_order(model)
    groups = sorted(groups, key=lambda g: position(order, g.module_name))
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tracked = sum(g.numel for g in groups)
    share = f"{100 * tracked / total:.1f}%" if total else "-"
    lines = [
        f"lightning_sphere: {_count(len(groups), 'module')}, "
        f"{_count(sum(g.num_groups for g in groups), 'radially invariant group')}, "
        f"{tracked:,} of {total:,} trainable parameters tracked ({share})"
    ]
    columns: tuple[_Column, ...] = _COLUMNS
    if corrections:
        columns += (_Column("correction", lambda g: corrections.get(g.module_name, "-"), False),)
    if groups:
        table = [[c.header for c in columns], *([c.cell(g) for c in columns] for g in groups)]
        widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
        for row in table:
            cells = (
                cell.rjust(w) if c.numeric else cell.ljust(w) for cell, w, c in zip(row, widths, columns, strict=True)
            )
            lines.append("  ".join(cells).rstrip())
    if untracked:
        lines.append("not tracked:")
        lines += [f"  {name}: {untracked[name]}" for name in sorted(untracked, key=lambda name: position(order, name))]
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is one: "1 module", "4,800 groups"."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"
