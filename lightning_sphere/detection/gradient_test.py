"""The gradient test (docs/theory.md §1.2): a candidate group is kept while its gradient is orthogonal to
its weights, within :func:`~lightning_sphere.core.tolerance.tolerance_for`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from lightning_sphere.core.groups import InvariantGroups
from lightning_sphere.core.rows import RowIndex, math_dtype
from lightning_sphere.core.tolerance import GRADIENT_TEST, indistinct, tolerance_for


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
