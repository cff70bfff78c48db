"""The Fabric-native form: a callback for ``Fabric(callbacks=[...])`` driving the Lightning callback's pieces.

Fabric runs no loop of its own: it calls ``on_after_setup(fabric, module)`` from ``fabric.setup`` and
``on_after_optimizer_step(strategy, optimizer)`` after each wrapped optimizer's step (Fabric 2.x), and every other
hook only where the user's loop says ``fabric.call(name, ...)``. The callback asks for two of those,
``on_before_backward`` (the loss, whose graph detection reads) and ``on_train_batch_end``, plus
``on_train_end`` to finish. The optimizers are met at their first step, by a global torch step pre-hook
(``torch.optim.optimizer.register_optimizer_step_pre_hook``) that keeps those stepping the model's parameters:
there the candidates are tested on the step's gradients with the weights still x_k, and the tracker built then
hooks the optimizer in time for this very step (torch runs an optimizer's own pre-hooks after the global ones).

The pieces are :mod:`~lightning_sphere.integrations.lightning`'s, given a :class:`_FabricLoop` where they expect a
Trainer: what they read of it (strategy, precision, optimizers, ranks, loggers) a Fabric has too.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException
from lightning_fabric.utilities.rank_zero import rank_zero_only, rank_zero_warn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from lightning_sphere.integrations.lightning.arguments import (
    _check_optimizers,
)
from lightning_sphere.integrations.lightning.framework import Framework
from lightning_sphere.integrations.lightning.pieces import CallbackPieces
from lightning_sphere.integrations.strategies import check_model
from lightning_sphere.tracking.tracker import SphereTracker

#: Fabric's strategies (either package's) that keep parameters whole on every rank, by class name
SUPPORTED = ("SingleDeviceStrategy", "DDPStrategy")
#: Lightning's default logging cadence, also this callback's
LOG_EVERY_N_STEPS = 50


@rank_zero_only
def _print(message: str) -> None:
    print(message, flush=True)


FRAMEWORK = Framework(
    MisconfigurationException,
    _print,
    rank_zero_warn,
    (),
    unseen_backward="whose loss was not shown to SphereCallback",
    show_backward='Call `fabric.call("on_before_backward", loss=loss)` right before `fabric.backward(loss)`.',
    callback="SphereCallback",
)


class _FabricLoop:
    """What the Lightning pieces read of a Trainer, from a Fabric: the optimizers are those met stepping the
    model."""

    def __init__(self, fabric: Any) -> None:
        self.fabric = fabric
        self.optimizers: list[torch.optim.Optimizer] = []

    @property
    def strategy(self) -> Any:
        return self.fabric.strategy

    @property
    def precision(self) -> str:
        return str(getattr(self.fabric.strategy.precision, "precision", "32-true"))

    @property
    def world_size(self) -> int:
        return int(self.fabric.world_size)

    @property
    def global_rank(self) -> int:
        return int(self.fabric.global_rank)

    @property
    def loggers(self) -> list[Any]:
        return list(self.fabric.loggers)


class SphereCallback(CallbackPieces):
    """Measure (and optionally correct) the spherical dynamics of a Fabric training loop's normalized filters.

    Add it to ``Fabric(callbacks=[...])``; ``fabric.setup(model, optimizer)`` hands it the model. In the loop,
    ``fabric.call("on_before_backward", loss=loss)`` before ``fabric.backward(loss)`` shows it the loss whose graph
    the first step's detection reads, and ``fabric.call("on_train_batch_end")`` after ``optimizer.step()`` logs;
    ``fabric.call("on_train_end")`` after the loop closes it. The first step finds and verifies the groups (the
    summary is printed on rank 0); every ``log_every_n_steps``-th optimizer step is measured and its metrics go
    to ``fabric.loggers`` under ``sphere/<metric>/<module name>`` and ``sphere/<metric>/all``, at the number of
    optimizer steps before it (0-based: steps 49, 99, … by default, as Lightning logs them).

    The arguments are :class:`~lightning_sphere.SphereMonitor`'s; ``log_every_n_steps=None`` means every 50 steps
    (Lightning's default), and the last step of a loop is not known, so not measured unless it is due.

    Raises:
        MisconfigurationException: (``lightning_fabric``'s) for an argument of the wrong type or value; at
            ``fabric.setup`` for a strategy that does not keep parameters whole (FSDP, DeepSpeed, model parallel)
            or a second model; at an optimizer's first step for an optimizer or option the spherical correction
            cannot honour.
    """

    _framework = FRAMEWORK
    _loop: _FabricLoop | None = None  # set by fabric.setup
    _params: frozenset[int] = frozenset()  # the model's parameters, by id: which optimizers step it
    _hook: Any = None  # the global step pre-hook
    _stepped = False  # an optimizer stepped in this batch
    _in_batch: tuple[Any, ...] = ()  # the optimizers that stepped in this batch
    _told_batch_end = False
    #: optimizer steps taken so far (batches in which an optimizer stepped)
    step = 0

    @property
    def tracker(self) -> SphereTracker | None:
        """The tracker of the modules tracked now (the lower-level object, :class:`~lightning_sphere.SphereTracker`)."""
        return self._tracked.tracker

    # ------------------------------------------------------------------ hooks

    def on_after_setup(self, fabric: Any, module: torch.nn.Module) -> None:
        """Called by ``fabric.setup``: the model to follow; its first batch is recorded."""
        error = FRAMEWORK.misconfiguration
        if self._loop is not None:
            raise error("SphereCallback follows one model: give each model set up with `fabric.setup` its own.")
        names = {cls.__name__ for cls in type(fabric.strategy).__mro__}
        if not names & set(SUPPORTED) or names & {"FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"}:
            raise error(
                f"SphereCallback does not support {type(fabric.strategy).__name__}: supported are a single device "
                "and DDP, which keep every filter whole on every rank. Use SphereTracker directly, or no callback."
            )
        reason = check_model(module)
        if reason:
            raise error(reason)
        every = self.log_every_n_steps or LOG_EVERY_N_STEPS
        histograms = 10 * every if self.histogram_every_n_steps is None else self.histogram_every_n_steps
        self._log.follow((every, histograms if self.selection.histograms else 0))
        self._loop, self._hook, self._stepped, self.step = _FabricLoop(fabric), None, False, 0
        self._params = frozenset(id(p) for p in module.parameters())
        self._follower.find(self._loop, module, self.groups_spec, self.tolerance)
        self._follower.restart()
        self._follower.start_batch()
        self._hook = register_optimizer_step_pre_hook(self._before_step)

    def on_before_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """The loss, right before ``fabric.backward(loss)``: its graph is read on a recorded batch."""
        if self._loop is not None:
            self._follower.analyze(loss)

    def on_after_optimizer_step(self, strategy: Any = None, optimizer: Any = None) -> None:
        """Called by Fabric's optimizer wrapper after each step (with its strategy and optimizer). An optimizer that
        steps twice with no ``on_train_batch_end`` between is a loop that never calls it: said once, since nothing
        would be logged."""
        if optimizer is not None and any(o is optimizer for o in self._in_batch) and not self._told_batch_end:
            self._told_batch_end = True
            FRAMEWORK.warn(
                'SphereCallback: an optimizer stepped twice without `fabric.call("on_train_batch_end")` between, so '
                "nothing is logged. Call it after `optimizer.step()` in every iteration (docs/guides/fabric.md)"
            )
        self._in_batch = (*self._in_batch, optimizer)
        self._stepped = True

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        """After the optimizer step: log a measured step, tell what changed, get ready for the next batch."""
        loop, follower = self._loop, self._follower
        if loop is None:
            return
        follower.end_batch()
        if self.correction is None:
            self._invariance.check_norms(self.step)
        measurement = None if self.tracker is None else self.tracker.collect()
        if measurement is not None:
            self._log.write(loop.loggers, measurement, self.step)
            if self.correction is None:
                dtype = follower.found.compute_dtype
                self._invariance.check_gradients(self.step, measurement, self.groups, self.tolerance, dtype)
        self.step += self._stepped
        self._stepped, self._in_batch = False, ()
        if loop.optimizers and follower.follow_trainable(loop.optimizers):
            self._update_tracker()
        self._tell()
        follower.start_batch()
        self._arm()

    def on_train_end(self, *args: Any, **kwargs: Any) -> None:
        """After the loop: histograms still due, hooks removed, the tracker closed (the AdamG rewrite's modules
        get their real weights back). The groups stay inspectable."""
        if self._loop is None:
            return
        self._log.write_due_histograms(self._loop.loggers, self.tracker)
        self._follower.teardown()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.tracker is not None:
            self.tracker.close()

    # ------------------------------------------------------------------ wiring

    def _before_step(
        self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Every torch optimizer's step pre-hook: one that steps the model is followed from its first step; on a
        step that may add groups, the candidates are tested on its gradients (weights still x_k)."""
        loop, follower = self._loop, self._follower
        if loop is None:
            return None
        if all(o is not optimizer for o in loop.optimizers):
            if not any(id(p) in self._params for g in optimizer.param_groups for p in g["params"]):
                return None  # another model's optimizer
            _check_optimizers(FRAMEWORK.misconfiguration, [optimizer], self.correction)
            loop.optimizers.append(optimizer)
            if follower.follow_trainable(loop.optimizers):
                self._update_tracker()
        if follower.may_add_groups and follower.verify(loop, optimizer, {}):
            self._update_tracker()  # its own pre-hooks, registered now, run next in this step
        return None

    def _update_tracker(self) -> None:
        assert self._loop is not None
        tracked = self._tracked
        built = tracked.update(
            self._loop,
            {},
            correction=self.correction,
            compile=self.compile,
            tolerance=self.tolerance,
            gradient_clipping=None,
        )
        if built and tracked.tracker is not None:
            self._invariance.watch_norms(tracked.tracker.groups, self._follower.found.model)
            self._announcements.changed = True
            self._arm()

    def _arm(self) -> None:
        """Measure the coming step if it logs: step k logs when (k + 1) is a multiple of the cadence."""
        if self.tracker is None:
            return
        every, histograms = self._log.cadence
        due = self.step + 1
        if due % every == 0:
            self.tracker.arm(histograms=bool(histograms) and due % histograms == 0)
        else:
            self.tracker.disarm()
