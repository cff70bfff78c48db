"""The modules tracked now: one :class:`~lightning_sphere.tracking.tracker.SphereTracker` for the verified modules
that are trainable and stepped, rebuilt whenever that set changes, and the optimizer step pre-hooks that let a
tracker built during a step read that step's gradients."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_sphere.core.groups import InvariantGroups
from lightning_sphere.integrations.lightning.follower import GroupFollower
from lightning_sphere.integrations.lightning.framework import Framework
from lightning_sphere.optimizers.modes import Mode
from lightning_sphere.tracking.probe import after_closure
from lightning_sphere.tracking.tracker import SphereTracker


class TrackedModules:
    """The tracker of the modules ``follower`` verified, as long as they are trainable and stepped.

    A new tracker takes over the AdamG rewrite's radii from the one it replaces (closed without giving the
    weights back), so that a module's rewrite goes on across rebuilds.
    """

    def __init__(self, framework: Framework, follower: GroupFollower) -> None:
        self._framework = framework
        self._follower = follower
        self.tracker: SphereTracker | None = None
        self._input: list[str] = []  # the modules the tracker was built for
        self._step_hooks: list[Any] = []

    @property
    def groups(self) -> list[InvariantGroups]:
        return [] if self.tracker is None else list(self.tracker.groups)

    def update(
        self,
        trainer: Any,
        radii: Mapping[str, Tensor],
        *,
        correction: Mode | None,
        compile: bool | None,
        tolerance: float | None,
        gradient_clipping: str | None,
    ) -> bool:
        """Track the verified modules that are trainable and stepped now, if that changed: a new tracker, with the
        AdamG rewrite's ``radii`` (restored from a checkpoint) and the old tracker's; the other arguments are the
        monitor's, and the Trainer's clipping. True when a new tracker was built."""
        follower = self._follower
        finder = follower.found
        eligible = follower.eligible()
        if self.tracker is not None and [e.module_name for e in eligible] == self._input:
            return False
        if self.tracker is None and not eligible:
            return False
        radii = dict(radii) | (self.tracker.radii() if self.tracker is not None else {})
        self.close(release=False)  # the radii go on in the new tracker
        accepted = _agree_across_ranks(trainer, eligible) if correction else eligible
        try:
            self.tracker = SphereTracker(
                accepted,
                trainer.optimizers,
                correction,
                compile,
                model=finder.model,
                tolerance=tolerance,
                compute_dtype=finder.compute_dtype,
                warn=self._framework.warn,
                gradient_clipping=gradient_clipping,
            )
        except ValueError as err:
            raise self._framework.misconfiguration(
                f"{self._framework.callback}(spherical_correction=...): {err}"
            ) from err
        self._input = [e.module_name for e in eligible]
        self.tracker.load_radii(radii)
        return True

    def close(self, release: bool = True) -> None:
        """Close the tracker (``release``: give the AdamG rewrite's modules their real weights back)."""
        if self.tracker is not None:
            self.tracker.close(release)
            self.tracker = None
        self._input = []

    def untracked(self) -> dict[str, str]:
        """Every layer not tracked now, with why: the finder's verdicts, and the tracker's own (a module it
        stopped correcting)."""
        tracked = {g.module_name for g in self.groups}
        untracked = self._follower.untracked(tracked)
        if self.tracker is not None:
            untracked |= self.tracker.untracked
        return untracked

    def statuses(self) -> dict[str, str]:
        """Every layer's membership: ``"tracked"``, or why not."""
        return {g.module_name: "tracked" for g in self.groups} | self.untracked()

    # ------------------------------------------------------------------ step pre-hooks

    def hook_steps(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.unhook_steps()
        self._step_hooks = [opt.register_step_pre_hook(self._before_step) for opt in optimizers]

    def unhook_steps(self) -> None:
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks = []

    def _before_step(
        self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """A step pre-hook on every optimizer, for the steps in which a tracker may be built (a recorded step,
        or candidates pending): one built in ``on_before_optimizer_step`` missed this step's pre-hook, which reads
        the gradients after the closure (Lightning's training step, backward and clipping); this does instead.
        Under AMP the closure has run before the step, and such a tracker's own pre-hook reads them."""
        if not self._follower.may_add_groups:
            return None

        def read() -> None:
            if self.tracker is not None:  # the tracker as it is after the closure, built during it or not
                self.tracker.gradients_ready(optimizer)

        return after_closure(args, kwargs, read)


def _agree_across_ranks(trainer: Any, accepted: list[InvariantGroups]) -> list[InvariantGroups]:
    """Rank zero's groups, on every rank: a correction must rewrite the same weights everywhere."""
    if trainer.world_size == 1:
        return accepted
    names = trainer.strategy.broadcast([g.module_name for g in accepted])
    mine = {g.module_name: g for g in accepted}
    missing = [n for n in names if n not in mine]
    if missing:
        raise RuntimeError(
            f"rank {trainer.global_rank} did not find the groups {missing} that rank 0 tracks; pass "
            "groups={...} to the callback to name them explicitly"
        )
    return [mine[n] for n in names]
