"""The monitor's checkpoint state: the verification verdicts, and what it keeps of the AdamG rewrite (the radii,
and the groups they go with).

A resumed run reuses a verdict only for the identical candidate (module, parameters, granularity), so that it
tracks the same groups; the optimizer's own checkpoint carries the moments the correction rescales and
transports, and the model's holds the real weights under the AdamG rewrite, from which the rewrite goes on
with the radii kept here. Format: keys ``accepted``, ``rejected``, ``radii``, ``radii_of`` and ``rewritten``
(a checkpoint of lightning_sphere 0.1 has only the first three, its radii going with unit-norm weights).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sphere.core.groups import InvariantGroups, ParamSlice
from lightning_sphere.core.names import named_parameters
from lightning_sphere.optimizers.modes import Mode
from lightning_sphere.tracking.tracker import SphereTracker

#: What the radii of a checkpoint's monitor state go with: the real weights its state dict holds.
_REAL_WEIGHTS = "real weights"


class CheckpointState:
    """What a checkpoint restored for the coming fit, and the state :meth:`state_dict` saves.

    Restored: the verification verdicts by candidate (so that a resumed run tracks the same groups) and the AdamG
    rewrite's virtual radii. All of it is for one fit only: :meth:`forget` at its end, so that a monitor reused
    for the next model starts clean.
    """

    def __init__(self) -> None:
        self.verdicts: dict[str, float | str] = {}
        self.radii: dict[str, Tensor] = {}  # with the stored weights (a checkpoint of version 0.1)
        self.resumed: dict[str, Tensor] = {}  # with the real weights (checkpoints since)
        self.resumed_groups: list[dict[str, Any]] = []  # the groups of those radii

    def state_dict(self, verdicts: Mapping[str, float | str], tracker: SphereTracker | None) -> dict[str, Any]:
        """The verdicts restored, updated by ``verdicts`` (this fit's), and ``tracker``'s radii with the specs of
        their groups."""
        verdicts = self.verdicts | dict(verdicts)
        radii = tracker.radii() if tracker is not None else {}
        groups = [] if tracker is None else [_group_spec(g) for g in tracker.groups if g.module_name in radii]
        return {
            "accepted": {k: v for k, v in verdicts.items() if not isinstance(v, str)},
            "rejected": {k: v for k, v in verdicts.items() if isinstance(v, str)},
            "radii": radii,
            "radii_of": _REAL_WEIGHTS,
            "rewritten": groups,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.verdicts = dict(state_dict.get("accepted", {})) | dict(state_dict.get("rejected", {}))
        radii = dict(state_dict.get("radii", {}))
        if state_dict.get("radii_of") == _REAL_WEIGHTS:
            self.resumed, self.resumed_groups = radii, list(state_dict.get("rewritten", []))
        else:  # a checkpoint of lightning_sphere 0.1: the stored unit-norm weights, with their radii
            self.radii = radii

    def resume_rewrite(self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], correction: Mode) -> None:
        """A checkpoint written under the AdamG rewrite holds the real weights r̂ u, and its monitor state the
        radii and the groups they go with: store u again before the first forward pass, so that the run goes on
        as if it had never stopped (its groups are read off that pass's graph only later)."""
        params = dict(named_parameters(model))
        groups = [g for spec in self.resumed_groups if (g := _group_from_spec(spec, params)) is not None]
        if groups:
            tracker = SphereTracker(groups, optimizers, correction, model=model, warn=lambda _: None)
            self.radii |= {name: self.resumed[name] for name in tracker.resume(self.resumed)}
            tracker.close(release=False)
        self.resumed, self.resumed_groups = {}, []

    def forget(self) -> None:
        """What a checkpoint restored was for this fit, not for the next model."""
        self.verdicts, self.radii, self.resumed, self.resumed_groups = {}, {}, {}, []


def _group_spec(entry: InvariantGroups) -> dict[str, Any]:
    """``entry`` in plain values, parameters by name: what a checkpoint keeps of a rewritten module."""
    slices = [
        {"name": s.name, "channel_dims": list(s.channel_dims), "split": s.split, "channels": s.channels}
        for s in entry.slices
    ]
    fields = ("module_name", "num_groups", "norm_name", "norm_type", "granularity", "channels_aligned")
    return {"slices": slices, **{f: getattr(entry, f) for f in fields}}


def _group_from_spec(spec: dict[str, Any], params: Mapping[str, nn.Parameter]) -> InvariantGroups | None:
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
