"""Per-layer summaries of per-group metrics, batched over all layers at once.

Every metric is reduced over the groups of each layer and over all groups together with the
statistic the theory calls for (the RMS of angular updates is what §7 predicts, the median effective
learning rate is robust to a few dead filters, …). Non-finite entries are undefined values and are
left out; a layer with no defined value gets a count of zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

REDUCTIONS = ("mean", "rms", "median", "maxabs")


def segment_reduce(values: Tensor, segment: Tensor, num_segments: int, how: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Reduce each row of ``values`` over the groups of each segment, and over all groups.

    Args:
        values: ``(n, M)`` per-group values; non-finite entries are ignored.
        segment: ``(M,)`` segment (layer) index of each group, in ``[0, num_segments)``.
        num_segments: number of segments ``L``.
        how: one reduction per row, from :data:`REDUCTIONS` (``maxabs`` is the largest absolute value,
            ``median`` the mean of the two middle values).

    Returns:
        ``(result, count)``, both ``(n, L + 1)``: column ``l < L`` is segment ``l``, the last column all
        groups; ``count`` is the number of finite values that entered each result.
    """
    unknown = set(how) - set(REDUCTIONS)
    if unknown or len(how) != values.shape[0]:
        raise ValueError(f"`how` must give one of {REDUCTIONS} per row of `values`, got {list(how)}")
    n = values.shape[0]
    valid = values.isfinite()
    zeroed = torch.where(valid, values, 0)
    index = segment.expand(n, -1)

    def per_segment_sum(v: Tensor) -> Tensor:
        out = v.new_zeros(n, num_segments).scatter_add_(1, index, v)
        return torch.cat([out, v.sum(1, keepdim=True)], 1)

    count = per_segment_sum(valid.to(values.dtype))
    safe_count = count.clamp(min=1)
    mean = per_segment_sum(zeroed) / safe_count
    rms = (per_segment_sum(zeroed.square()) / safe_count).sqrt()
    magnitude = zeroed.abs()
    maxabs = torch.cat(
        [
            magnitude.new_zeros(n, num_segments).scatter_reduce_(1, index, magnitude, "amax"),
            magnitude.amax(1, keepdim=True),
        ],
        1,
    )
    result = torch.stack([{"mean": mean, "rms": rms, "maxabs": maxabs}.get(h, mean)[row] for row, h in enumerate(how)])
    rows = [row for row, h in enumerate(how) if h == "median"]
    if rows:  # sorting is the costly part: only for the rows that ask for it
        result[rows] = _segment_median(values[rows], valid[rows], segment, num_segments, count[rows])
    return result, count


def _segment_median(values: Tensor, valid: Tensor, segment: Tensor, num_segments: int, count: Tensor) -> Tensor:
    """Median per segment and overall: sort by value, then stably by segment, and index the middle."""
    n, m = values.shape
    if m == 0:
        return values.new_zeros(n, num_segments + 1)
    overall, order = torch.where(valid, values, torch.inf).sort(dim=1)
    grouped = overall.gather(1, segment[order].argsort(dim=1, stable=True))  # ascending per segment
    sizes = torch.bincount(segment, minlength=num_segments)
    start = torch.cat([torch.cumsum(sizes, 0) - sizes, sizes.new_zeros(1)])
    c = count.long().clamp(min=1)
    lower = (start + (c - 1) // 2).clamp(max=m - 1)
    upper = (start + c // 2).clamp(max=m - 1)

    def middle(rows: Tensor, columns: slice) -> Tensor:
        return (rows.gather(1, lower[:, columns]) + rows.gather(1, upper[:, columns])) / 2

    return torch.cat([middle(grouped, slice(0, num_segments)), middle(overall, slice(num_segments, None))], 1)
