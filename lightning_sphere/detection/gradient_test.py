"""The gradient test (docs/theory.md §1.2): a candidate group is kept while its gradient is orthogonal to
its weights, within :func:`~lightning_sphere.core.tolerance.tolerance_for`; and why a candidate failed it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from lightning_sphere.core.groups import InvariantGroups
from lightning_sphere.core.names import get_submodule
from lightning_sphere.core.rows import RowIndex, math_dtype
from lightning_sphere.core.tolerance import GRADIENT_TEST, indistinct, noise_floor, random_cosine, tolerance_for


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
    candidates: list[InvariantGroups] = []
    waiting: list[InvariantGroups] = []
    for entry in groups:
        (candidates if all(p in grads for p in entry.params) else waiting).append(entry)
    accepted, rejected = [], []
    for entry, cos in zip(candidates, gradient_cosines(candidates, grads), strict=True):
        if cos is None:
            waiting.append(entry)
        elif entry.group_size == 1:  # no cosine tells anything in one dimension (failure_reason says why)
            rejected.append(replace(entry, cosine=cos))
        elif cos <= tolerance_for(entry, tolerance, compute_dtype) or (
            indistinct(entry, compute_dtype) and entry.norm_type != GRADIENT_TEST
        ):
            accepted.append(replace(entry, cosine=cos))
        else:
            rejected.append(replace(entry, cosine=cos))
    return accepted, rejected, waiting


def verify_with_fallback(
    groups: Sequence[InvariantGroups],
    grads: Mapping[nn.Parameter, Tensor],
    fallback: dict[str, InvariantGroups],
    tolerance: float | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[list[InvariantGroups], list[InvariantGroups], list[InvariantGroups]]:
    """:func:`verify`, then the coarser candidate ``fallback[module]`` of each module rejected (the numeric
    test: per channel, then whole), which is popped from ``fallback`` and replaces its finer one's verdict.

    One device-to-host transfer, two when a fallback is tried.
    """
    accepted, rejected, waiting = verify(groups, grads, tolerance, compute_dtype)
    retry = [fallback.pop(entry.module_name) for entry in rejected if entry.module_name in fallback]
    if retry:
        accepted_again, rejected_again, _ = verify(retry, grads, tolerance, compute_dtype)
        accepted += accepted_again
        retried = {entry.module_name for entry in retry}
        rejected = [e for e in rejected if e.module_name not in retried] + rejected_again
    return accepted, rejected, waiting


def failure_reason(
    entry: InvariantGroups, model: nn.Module, tolerance: float | None, compute_dtype: torch.dtype | None
) -> str:
    """The true reason a candidate of ``model`` failed the gradient test: its cosine next to the threshold and
    to a random direction's; 16-bit round-off when the test cannot tell; the normalization's eps when the
    structure vouched for it."""
    d = entry.group_size
    if d == 1:
        return (
            f"one entry per group (d = 1, {entry.num_groups:,} groups): a group's direction is its sign, so there "
            "is no step on a sphere to measure, and |cos(g, x)| is 1 whatever the gradient; it steps as the "
            "optimizer has it"
        )
    yardstick = (
        f"max |cos(g, x)| = {entry.cosine:.1e} > {tolerance_for(entry, tolerance, compute_dtype):.1e}, "
        f"while a random direction shows about 1/√d = {random_cosine(d):.1e} (d = {d:,})"
    )
    if entry.norm_count is not None and entry.norm_count <= 2:
        return (
            f"{entry.norm_name} ({entry.norm_type}) normalizes only {entry.norm_count} value"
            f"{'s' if entry.norm_count > 1 else ''} together on this batch (a BatchNorm over a 1×1 map of a batch of "
            "2, say): its output is ±1 (or 0) whatever its input, so the gradient it passes back is round-off and "
            f"eps, which cannot verify the layer ({yardstick}); it steps as the optimizer has it"
        )
    if entry.norm_type == GRADIENT_TEST:
        if indistinct(entry, compute_dtype):
            floor = noise_floor(compute_dtype or entry.slices[0].param.dtype)
            return (
                f"the gradient test cannot tell at d = {d:,}: 16-bit round-off ({floor:.1e}) reaches what a random "
                "direction shows; name it in groups= to track it"
            )
        return f"gradient not orthogonal to the weights: {yardstick}"
    if entry.unknown_eps:
        return (
            f"invariant only up to the constant added at {entry.unknown_eps} to what it divides by (an eps of "
            f"unknown size), which is not small next to it on this batch: {yardstick}"
        )
    eps = getattr(_norm(model, entry), "eps", None)
    if isinstance(eps, float) and eps > 0:
        return (
            f"invariant only up to the eps of {entry.norm_name} ({entry.norm_type}), eps={eps:g}, which is not "
            f"small next to the variance it normalizes on this batch: {yardstick}"
        )
    return f"gradient not orthogonal to the weights, whatever the structure says: {yardstick}"


def _norm(model: nn.Module, entry: InvariantGroups) -> nn.Module | None:
    try:
        return get_submodule(model, entry.norm_name) if entry.norm_name else None
    except AttributeError:
        return None
