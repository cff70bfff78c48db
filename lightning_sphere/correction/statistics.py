"""The running statistics of the norms after the AdamG rewrite's modules, kept those of plain SGD in the
stored scale (docs/theory.md §4.3).

A BatchNorm (or InstanceNorm) that keeps running statistics averages what it sees: the outputs of the stored
weights u = x/r̂, about the layer's bias b outside the groups (which the norm cancels) 1/r̂ times plain SGD's.
So that eval mode computes what it would under plain SGD, its running mean and variance are kept in the same
scale as the stored weights: whenever the radius moves from r̂ to r̂', the variance is multiplied by (r̂/r̂')²
and the mean, about b, by r̂/r̂'. All of it in a few ``_foreach`` calls on the device, no host sync.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, cast

import torch
from torch import Tensor, nn

from lightning_sphere.core.groups import InvariantGroups
from lightning_sphere.core.rows import RowIndex


class _TrackingNorm(Protocol):
    """A norm that keeps running statistics (a BatchNorm, an InstanceNorm with ``track_running_stats``): the
    norms whose eval mode breaks a module's invariance, the only ones :class:`RunningStatistics` is given."""

    num_features: int
    running_mean: Tensor
    running_var: Tensor


class RunningStatistics:
    """The norms whose running statistics follow the AdamG rewrite's virtual radii, one channel per group.

    Args:
        index: the rewrite's rows and groups (a norm's channels are its module's groups, in order).

    Attributes:
        norms: ``(module index, norm)`` for every norm whose running statistics follow the radius.
        shifts: for each of ``norms``, the layer's bias outside the groups (zeros if none) and its value when
            the statistics were last synced, ``(num_features,)`` each.
    """

    def __init__(self, index: RowIndex) -> None:
        self.index = index
        self.norms: list[tuple[int, _TrackingNorm]] = []
        self.shifts: list[tuple[Tensor, Tensor]] = []

    def follow(
        self,
        i: int,
        entry: InvariantGroups,
        norms: Sequence[nn.Module],
        shift: Callable[[InvariantGroups], Tensor | None],
    ) -> bool:
        """Make the running statistics of ``norms``, after module ``i`` (``entry``), follow its radius, if they
        can: each norm's channels are the module's groups one by one (channels not moved on the way). Returns
        whether they can. ``shift``: the layer's bias the norm cancels, if any (the safeguards')."""
        if not (entry.channels_aligned and all(n.num_features == entry.num_groups for n in norms)):
            return False
        # nn.Module types its attributes as modules or tensors; these norms normalize with running statistics
        tracking = [cast(_TrackingNorm, n) for n in norms]
        self.norms += [(i, n) for n in tracking]
        bias = shift(entry)
        for n in tracking:
            b = n.running_mean.new_zeros(n.num_features) if bias is None else bias.detach()
            self.shifts.append((b, b.to(n.running_mean.dtype, copy=True)))
        return True

    def tensors(self) -> list[Tensor]:
        """The running means and variances that follow the radius, which a state dict holds in plain SGD's
        scale (:meth:`real_value`)."""
        return [t for _, n in self.norms for t in (n.running_mean, n.running_var)]

    def rescale(self, factor: Tensor, old_scale: Tensor) -> None:
        """Keep every synced norm's running statistics those of plain SGD in the stored scale (see
        :meth:`rescaled`), in place, and note the layer's bias they are synced with now."""
        means, variances = self.rescaled(factor, old_scale)
        torch._foreach_copy_([n.running_mean for _, n in self.norms], means)
        torch._foreach_copy_([n.running_var for _, n in self.norms], variances)
        torch._foreach_copy_([r for _, r in self.shifts], [b.to(r.dtype) for b, r in self.shifts])

    def rescaled(self, factor: Tensor, old_scale: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Every synced norm's running (means, variances) for plain SGD in the stored scale, per group, out of
        place: variance × ``factor``² and mean = b + (plain mean − b)·(stored/real scale), b the layer's bias
        outside the groups. A forward's update keeps that relation; a step that moved b rebases it (× (1 − 1/r̂)
        of the move, ``old_scale`` the r̂ before the step), and the radius moving from r̂ to r̂' rescales it by
        ``factor`` = r̂/r̂' about b. ``factor``, ``old_scale``: ``(M,)``, per group. All in a few ``_foreach``
        calls."""
        live_means: list[Tensor] = []
        live_variances: list[Tensor] = []
        factors: list[Tensor] = []
        coefficients: list[Tensor] = []
        for i, norm in self.norms:
            groups = self.index.groups[i]
            live_means.append(norm.running_mean)
            live_variances.append(norm.running_var)
            factors.append(factor[groups].to(norm.running_mean.dtype))
            coefficients.append((1 - 1 / old_scale[groups]).to(norm.running_mean.dtype))
        biases = [b.to(m.dtype) for (b, _), m in zip(self.shifts, live_means, strict=True)]
        synced = [r for _, r in self.shifts]
        variances = torch._foreach_mul(live_variances, torch._foreach_mul(factors, factors))
        means = torch._foreach_addcmul(live_means, torch._foreach_sub(biases, synced), coefficients)
        torch._foreach_sub_(means, biases)
        torch._foreach_mul_(means, factors)
        torch._foreach_add_(means, biases)
        return means, variances

    def real_value(self, live: Tensor, value: Tensor, radius: Tensor) -> Tensor | None:
        """What ``live``, a running statistic of :meth:`tensors`, holds in plain SGD's model, as a new tensor
        shaped and typed like ``value`` (its state dict's entry); ``radius``: the rewrite's ``(M,)`` virtual radii
        (NaN where the stored weights are the real ones). ``None`` for any other tensor."""
        for j, (_, norm) in enumerate(self.norms):
            if live is norm.running_mean or live is norm.running_var:
                scale = torch.where(~radius.isnan(), radius, 1)
                means, variances = self.rescaled(scale, scale)
                return (means if live is norm.running_mean else variances)[j].to(value.dtype, copy=True)
        return None
