"""What both callbacks hold, the Trainer's (:mod:`~.monitor`) and Fabric's (``integrations/fabric.py``): the
constructor's arguments checked, the collaborators built from them, and what they show the user."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_sphere.core.groups import InvariantGroups
from lightning_sphere.integrations.lightning.announcements import Announcements
from lightning_sphere.integrations.lightning.arguments import _check_arguments, _correction, _selection
from lightning_sphere.integrations.lightning.checkpoint import CheckpointState
from lightning_sphere.integrations.lightning.follower import GroupFollower
from lightning_sphere.integrations.lightning.framework import Framework
from lightning_sphere.integrations.lightning.invariance import InvarianceWatch
from lightning_sphere.integrations.lightning.metric_log import MetricLog
from lightning_sphere.integrations.lightning.tracked import TrackedModules
from lightning_sphere.reporting.sinks import PER_LAYER
from lightning_sphere.reporting.summary import summarize
from lightning_sphere.tracking.tracker import SphereTracker


class CallbackPieces:
    """The checked arguments (``SphereMonitor``'s, documented there) and the collaborators every hook drives."""

    _framework: Framework

    def __init__(
        self,
        groups: str | dict[str, str | int] = "auto",
        log_every_n_steps: int | None = None,
        histogram_every_n_steps: int | None = None,
        custom_scalars: bool = True,
        tolerance: float | None = None,
        spherical_correction: bool | str = False,
        compile: bool | None = None,
        metrics: Sequence[str] | None = None,
        per_layer: bool | Sequence[str] = PER_LAYER,
    ) -> None:
        error, name = self._framework.misconfiguration, self._framework.callback
        _check_arguments(
            error,
            name,
            groups=groups,
            log_every_n_steps=log_every_n_steps,
            histogram_every_n_steps=histogram_every_n_steps,
            custom_scalars=custom_scalars,
            tolerance=tolerance,
            compile=compile,
            metrics=metrics,
            per_layer=per_layer,
        )
        self.selection = _selection(error, metrics, per_layer, name)
        self.groups_spec = groups
        self.correction = _correction(error, spherical_correction, name)
        self.compile = compile
        self.log_every_n_steps = log_every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self.tolerance = tolerance
        self._announcements = Announcements(self._framework)
        self._follower = GroupFollower(self._framework, self._announcements)
        self._tracked = TrackedModules(self._framework, self._follower)
        self._log = MetricLog(self.selection, custom_scalars, self._framework.warn)
        self._invariance = InvarianceWatch(self._framework)
        self._checkpoint = CheckpointState()

    @property
    def groups(self) -> list[InvariantGroups]:
        """The tracked modules, once found (after the first training step)."""
        return self._tracked.groups

    @property
    def metrics(self) -> dict[str, float]:
        """The last logged values, with the loggers' keys."""
        return dict(self._log.metrics)

    @property
    def _tracker(self) -> SphereTracker | None:
        """The tracker of the modules tracked now (introspection, for tests)."""
        return self._tracked.tracker

    def summary(self) -> str:
        """The table printed at the start of training: tracked modules, and every other layer with the reason
        it is not tracked now; tracked modules whose invariance was lost later (measurement only)."""
        finder = self._follower.finder
        if finder is None:
            return "lightning_sphere: no training step seen yet"
        corrections = {} if self._tracker is None else self._tracker.corrections
        text = summarize(self.groups, finder.model, self._tracked.untracked(), corrections)
        return text + self._invariance.summary_sections()

    def _tell(self, fresh_line: bool = False) -> None:
        """At the end of a batch that may have changed membership: the summary, or what changed (``fresh_line``:
        start the summary on a line of its own, below a progress bar)."""
        self._announcements.tell(self._follower, self._tracked, self.summary, self.correction is not None, fresh_line)
