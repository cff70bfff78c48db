"""What the monitor's checkpoint state keeps of the AdamG rewrite: the radii, and the groups they go with."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lightning_sphere.core.groups import InvariantGroups, ParamSlice

#: What the radii of a checkpoint's monitor state go with: the real weights its state dict holds.
_REAL_WEIGHTS = "real weights"


def _group_spec(entry: InvariantGroups) -> dict[str, Any]:
    """``entry`` in plain values, parameters by name: what a checkpoint keeps of a rewritten module."""
    slices = [
        {"name": s.name, "channel_dims": list(s.channel_dims), "split": s.split, "channels": s.channels}
        for s in entry.slices
    ]
    fields = ("module_name", "num_groups", "norm_name", "norm_type", "granularity", "channels_aligned")
    return {"slices": slices, **{f: getattr(entry, f) for f in fields}}


def _group_from_spec(spec: dict[str, Any], params: Mapping[str, Tensor]) -> InvariantGroups | None:
    """The :class:`InvariantGroups` :func:`_group_spec` described, on ``params`` (by name); ``None`` if the
    model has no such parameter any more."""
    if any(s["name"] not in params for s in spec["slices"]):
        return None
    slices = tuple(
        ParamSlice(
            s["name"],
            params[s["name"]],
            tuple(s["channel_dims"]),
            s["split"],
            None if s["channels"] is None else tuple(s["channels"]),
        )
        for s in spec["slices"]
    )
    return InvariantGroups(**{k: v for k, v in spec.items() if k != "slices"}, slices=slices)
