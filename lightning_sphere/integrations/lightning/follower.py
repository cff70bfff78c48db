"""Following detection through training: the :class:`~lightning_sphere.detection.finder.GroupFinder` driven by the
Trainer's hooks.

A batch whose forward passes are recorded (the first, and any that may call a layer not analysed yet) has the
graph of each of its backward passes analysed in ``on_before_backward`` (a backward Lightning does not see is
caught at the optimizer step); candidates are verified on the gradients of ``on_before_optimizer_step``
(weights still ``x_k``). At the start and the end of every batch the set of trainable parameters the optimizers
step is compared with the last one seen (a Python pass over their flags): when it changed, layers are examined
again.
"""

from __future__ import annotations

import operator
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_sphere.core.groups import InvariantGroups
from lightning_sphere.detection.finder import MAX_TRIES, GroupFinder
from lightning_sphere.integrations.lightning.announcements import Announcements
from lightning_sphere.integrations.lightning.framework import Framework
from lightning_sphere.integrations.strategies import cut_by_shards, rebind


class GroupFollower:
    """The group finder of the model being fit, fed by the Trainer's hooks: recorded forward passes, analysed
    backward passes, verification on each step's gradients, and the trainable parameters the optimizers step.

    It finds and verifies; which of the verified modules are tracked is
    :class:`~lightning_sphere.integrations.lightning.tracked.TrackedModules`' business: :meth:`follow_trainable`
    and :meth:`verify` say when that may have changed. Every change to membership is marked on ``announcements``.
    """

    def __init__(self, framework: Framework, announcements: Announcements) -> None:
        self._framework = framework
        self._announcements = announcements
        self.finder: GroupFinder | None = None
        self.recording = False
        self._record_next = True  # some trainable layer's structure is not known yet
        self._eager_next = True  # run the next recorded step eagerly (torch.compile)
        self._eager: Any = None  # the compiler's stance to restore
        self._backward_seen = False
        self._warned_direct_backward = False
        self.steps_seen = 0
        self._stepped_in_batch: set[Any] = set()
        # The trainable parameters the optimizers step (→ which one), as at the start of the batch (a
        # toggle_optimizer freezes some during a step), and what they looked like at the last check: when
        # that changes (a layer unfrozen, a param group added), layers are examined again.
        self.stepped: dict[Tensor, Any] = {}
        self.signature: tuple[Any, ...] | None = None
        self._signatures = _Signature()

    # ------------------------------------------------------------------ fit

    def find(self, trainer: Any, pl_module: Any, groups: Any, tolerance: float | None) -> None:
        """Start looking for ``pl_module``'s groups (``groups``, ``tolerance``: the monitor's arguments)."""
        try:
            self.finder = GroupFinder(pl_module, groups, tolerance, _compute_dtype(trainer), MAX_TRIES)
        except ValueError as err:
            raise self._framework.misconfiguration(f"{self._framework.callback}(groups=...): {err}") from err

    def restart(self) -> None:
        """At fit start: record the first batch (eagerly), and compare trainable parameters afresh."""
        self.signature = None
        self._record_next = self._eager_next = True
        self.steps_seen = 0

    def teardown(self) -> None:
        self.compile_again()
        if self.finder is not None:
            self.finder.finish()
        self.recording = False

    @property
    def found(self) -> GroupFinder:
        """The finder, for the callers that run only once :meth:`find` made it: the monitor's batch hooks return
        early without one (so recording, verification and the tracker only happen with one)."""
        assert self.finder is not None, "no group finder yet: find() runs at setup, or at fit start when sharded"
        return self.finder

    @property
    def ready(self) -> bool:
        """Whether the first verdicts are in (the summary can be printed): the graph analysed, a step seen, and no
        candidate retried."""
        finder = self.found
        return bool(finder.analyzed and self.steps_seen and not finder.retrying)

    @property
    def may_add_groups(self) -> bool:
        """Whether a step under way may build a tracker: one that records, or with candidates pending."""
        return self.finder is not None and bool(self.recording or self.finder.pending)

    def eligible(self) -> list[InvariantGroups]:
        """The verified modules that are trainable and stepped now."""
        finder = self.found
        return [e for e in finder.accepted if finder.eligible(e, self.stepped)]

    def untracked(self, tracked: Collection[str]) -> dict[str, str]:
        """Every other layer, with the reason it is not tracked now."""
        return self.found.untracked(self.stepped if self.signature is not None else None, tracked)

    # ------------------------------------------------------------------ batch

    def follow_trainable(self, optimizers: Sequence[torch.optim.Optimizer]) -> bool:
        """Re-examine when the set of trainable parameters the optimizers step changed: one pass over their
        flags, a cheap Python check, at the start of a batch and at its end (``training_step`` may flip them).
        True when it changed (the first check included): the tracked modules may change."""
        signature = self._signatures(optimizers)
        if signature == self.signature:
            return False
        if self.signature is not None:
            self.found.reexamine()
            self._record_next = self._eager_next = True
        self.signature = signature
        self.stepped = {p: opt for opt in optimizers for g in opt.param_groups for p in g["params"] if p.requires_grad}
        self._announcements.changed = True
        return True

    def flipped_in_batch(self, optimizers: Sequence[torch.optim.Optimizer]) -> bool:
        """At the end of a batch that started followed: :meth:`follow_trainable`, for a flag ``training_step``
        flipped (so that the summary says so at once)."""
        return self.finder is not None and self.signature is not None and self.follow_trainable(optimizers)

    def start_batch(self) -> None:
        """Record this batch's forward passes if a layer's structure may not be known yet."""
        self._stepped_in_batch = set()
        if self._record_next:
            self.found.start()  # record this batch's forward passes: every backward pass of it is analyzed
            self.recording, self._backward_seen = True, False
            if self._eager_next:
                # torch.compile'd code would skip the recording hooks (a model compiled earlier) or break its
                # graphs at them for good: this one step runs eagerly, later ones compile without the hooks.
                self._eager_next = False
                self._eager = torch.compiler.set_stance("force_eager")

    def analyze(self, loss: Tensor) -> None:
        """Read the layers off the graph of a recorded batch's backward pass."""
        if self.recording:
            self.found.analyze([loss])
            self._backward_seen = self._announcements.changed = True

    def verify(self, trainer: Any, optimizer: torch.optim.Optimizer, restored: Mapping[str, float | str]) -> bool:
        """Read what the step's graphs hold, and test the pending candidates on the step's gradients
        (``restored``: the verdicts of a checkpoint, reused for the identical candidates). True when the tracked
        modules may change."""
        finder = self.found
        self.steps_seen += 1
        if self.recording and not self._backward_seen and finder.has_layer_calls():
            self._read_unseen_backward(finder)
        if self.recording and finder.analyze_recomputed():
            self._announcements.changed = True
        if not finder.pending:
            return False
        if isinstance(trainer.strategy, self._framework.sharding_strategies):
            # FSDP2: the graph was read while some layers held unsharded copies of their parameters
            finder.pending = rebind(finder.pending, finder.model)
            for entry, why in cut_by_shards(finder.pending):
                finder.reject([entry], why)
                self._framework.warn(f"{self._framework.callback}: {entry.module_name} is not tracked: {why}")
        before = len(finder.accepted)
        if restored:
            finder.restore(restored)
        # Only modules of optimizers that have not stepped yet in this batch: after its step, an optimizer's
        # gradients no longer belong to its weights.
        stepped_before, self._stepped_in_batch = self._stepped_in_batch, self._stepped_in_batch | {optimizer}
        entries = [
            e
            for e in finder.pending
            if all(p.requires_grad and p in self.stepped and self.stepped[p] not in stepped_before for p in e.params)
        ]
        grads = {p: p.grad for entry in entries for p in entry.params if p.grad is not None}
        if grads:  # else nothing to decide on this step: no host sync
            for entry in finder.verify(grads, entries):
                self._announcements.not_tracked(entry.module_name, finder.rejected[entry.module_name])
            self._announcements.changed = True
        return len(finder.accepted) != before or bool(grads)

    def end_batch(self) -> None:
        """Stop recording; record the next batch too if a layer was not called yet."""
        if self.recording:
            finder = self.found
            finder.finish()
            self.recording = False
            self._record_next = bool(finder.unseen_layers())
        self.compile_again()

    def compile_again(self) -> None:
        if self._eager is not None:
            self._eager.__exit__(None, None, None)  # the compiler's stance as it was
            self._eager = None

    def _read_unseen_backward(self, finder: GroupFinder) -> None:
        """A backward pass ran that Lightning did not announce (``loss.backward()`` in manual optimization):
        read the layers off the graph up to the recorded modules' outputs, and say how to do better."""
        finder.analyze_outputs()
        self._announcements.changed = True
        if not self._warned_direct_backward:
            self._warned_direct_backward = True
            self._framework.warn(
                f"{self._framework.callback}: an optimizer stepped after a backward pass "
                f"{self._framework.unseen_backward}, so the loss's graph could not be read. Layers were found from "
                "the graph up to the modules' own outputs instead; a use of a layer's output that bypasses every "
                "layer and normalization is missed "
                f"there (the gradient test still catches what it breaks). {self._framework.show_backward}"
            )


class _Signature:
    """What the optimizers step, cheaply: which parameter lists they hold (rebuilt only when those change,
    e.g. by ``add_param_group``), and whether each parameter is trainable (identity and flags, not values)."""

    def __init__(self) -> None:
        self._lists: tuple[tuple[int, int], ...] = ()
        self._params: list[Tensor] = []

    def __call__(self, optimizers: Sequence[torch.optim.Optimizer]) -> tuple[Any, ...]:
        lists = tuple((id(g["params"]), len(g["params"])) for opt in optimizers for g in opt.param_groups)
        if lists != self._lists:
            self._lists = lists
            self._params = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
        return lists, tuple(map(_REQUIRES_GRAD, self._params))


_REQUIRES_GRAD = operator.attrgetter("requires_grad")


def _compute_dtype(trainer: Any) -> torch.dtype | None:
    """The 16-bit dtype gradients are computed in under the Trainer's precision, if any."""
    precision = str(trainer.precision)
    return torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else None
