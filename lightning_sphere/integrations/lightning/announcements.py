"""Telling the user which modules are tracked: the summary once, when the first verdicts are in, then one line per
module whose membership changed, at the end of the batch it changed on."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lightning_sphere.core.groups import InvariantGroups
from lightning_sphere.integrations.lightning.framework import Framework


class Announcements:
    """What the user was told of each module's membership, and whether it may have changed since.

    Whoever may change membership (an analysed backward pass, a verdict, a rebuilt tracker, a layer unfrozen)
    sets :attr:`changed`; the end of the batch then either prints the summary (:meth:`summarize`, once) or
    compares the statuses with what was last told (:meth:`announce`).
    """

    def __init__(self, framework: Framework) -> None:
        self._framework = framework
        #: membership may have changed on this batch: announce at its end
        self.changed = False
        #: the summary was printed (on this fit)
        self.summarized = False
        #: module → "tracked" or why not, as last told
        self.told: dict[str, str] = {}

    def not_tracked(self, name: str, why: str) -> None:
        """A verdict told at once, as a warning (and not told again at the end of the batch)."""
        self._framework.warn(f"{self._framework.callback}: {name} is not tracked: {why}")
        self.told[name] = why

    def tell(
        self,
        follower: Any,
        tracked: Any,
        summary: Callable[[], str],
        correcting: bool = False,
        fresh_line: bool = False,
    ) -> None:
        """At the end of a batch that may have changed membership: the ``summary``, once the first verdicts are in
        (``follower``: the ``GroupFollower``); after it, one line per module whose membership changed
        (``tracked``: the ``TrackedModules``). ``fresh_line``: a progress bar holds the current line (the summary
        starts below it)."""
        if follower.finder is None or not self.changed:
            return
        if self.summarized:
            self.announce(tracked.statuses(), tracked.groups)
        elif follower.ready:  # else wait for the verdicts
            self.summarize(tracked.statuses(), tracked.groups, summary(), correcting, fresh_line)

    def summarize(
        self,
        statuses: dict[str, str],
        groups: Sequence[InvariantGroups],
        summary: str,
        correcting: bool = False,
        fresh_line: bool = False,
    ) -> None:
        """Print ``summary`` (as a warning when no group is tracked, which says too that a spherical correction,
        if ``correcting``, has nothing to rewrite; ``fresh_line``: below a progress bar); ``statuses`` are told by
        it."""
        self.summarized, self.changed = True, False
        self.told = statuses
        if groups:
            self._framework.info(("\n" if fresh_line else "") + summary)
        else:
            self._framework.warn(
                f"{self._framework.callback} found no radially invariant group (a Conv/Linear layer whose output only "
                "feeds a normalization in training mode); training continues unmonitored"
                + (
                    ", and spherical_correction has nothing to rewrite: every step is the optimizer's own"
                    if correcting
                    else ""
                )
                + ".\n"
                + summary
            )

    def announce(self, statuses: Mapping[str, str], groups: Sequence[InvariantGroups]) -> None:
        """One line per module whose status changed since the last announcement (``groups``: the tracked ones)."""
        self.changed = False
        for name, status in statuses.items():
            before = self.told.get(name)
            if status == before or status == "waiting for a gradient to verify it":
                continue
            if status == "tracked":
                entry = next(g for g in groups if g.module_name == name)
                norm = f"{entry.norm_name} ({entry.norm_type})" if entry.norm_name else entry.norm_type
                self._framework.info(
                    f"{self._framework.callback}: now tracking {name}: {entry.num_groups} groups of {entry.group_size} "
                    f"({entry.granularity}), {norm}"
                )
            elif before == "tracked":
                self._framework.info(f"{self._framework.callback}: {name} is not tracked any more: {status}")
            else:
                self._framework.info(f"{self._framework.callback}: {name} is not tracked: {status}")
            self.told[name] = status
