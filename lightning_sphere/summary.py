"""The table of tracked groups printed at the start of training."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from lightning_sphere.groups import InvariantGroups


def summarize(
    groups: Sequence[InvariantGroups],
    model: nn.Module,
    untracked: Mapping[str, str] | None = None,
    corrections: Mapping[str, str] | None = None,
) -> str:
    """A text table: one row per tracked module, the tracked share of the trainable parameters, and
    every module left out with the reason. ``corrections`` (module name → the algorithm its spherical
    correction makes it follow) adds a column."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tracked = sum(g.numel for g in groups)
    share = f"{100 * tracked / total:.1f}%" if total else "-"
    lines = [
        f"lightning_sphere: {len(groups)} modules, {sum(g.num_groups for g in groups):,} radially invariant groups, "
        f"{tracked:,} of {total:,} trainable parameters tracked ({share})"
    ]
    header = ("module", "granularity", "groups", "d", "normalization", "max|cos(g,x)|")
    rows = [
        (
            g.module_name,
            g.granularity,
            f"{g.num_groups:,}",
            f"{g.dim:,}",
            f"{g.norm_name} ({g.norm_type})" if g.norm_name else g.norm_type,
            "-" if g.cosine is None else f"{g.cosine:.1e}",
        )
        for g in groups
    ]
    if corrections:
        header += ("correction",)
        rows = [(*row, corrections.get(g.module_name, "-")) for row, g in zip(rows, groups, strict=True)]
    if rows:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            lines.append(
                "  ".join(
                    cell.ljust(w) if i in (0, 1, 4, 6) else cell.rjust(w)
                    for i, (cell, w) in enumerate(zip(row, widths, strict=True))
                ).rstrip()
            )
    if untracked:
        lines.append("not tracked:")
        lines += [f"  {name}: {why}" for name, why in untracked.items()]
    return "\n".join(lines)
