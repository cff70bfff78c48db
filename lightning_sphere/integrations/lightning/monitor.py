"""The SphereMonitor callback logic, shared by the ``pytorch_lightning`` and ``lightning.pytorch`` classes.

Hook order this relies on (Lightning 2.x, see the developers' notes): a batch whose forward passes are
recorded (the first, and any that may call a layer not analysed yet) has the graph of each of its backward
passes analysed in ``on_before_backward`` (a backward Lightning does not see is caught at the optimizer
step); candidates are verified on the gradients of ``on_before_optimizer_step`` (weights still ``x_k``);
the torch optimizer step hooks measure armed steps (they do not fire on AMP-skipped steps);
``on_train_batch_end`` collects and logs at Lightning's own step and cadence. ``on_train_batch_start``
compares the set of trainable parameters the optimizers step with the last batch's (a Python pass over
their flags): when it changed, layers are examined again and the tracker is rebuilt.

:class:`SphereMonitorLogic` is the hooks; each concern is a collaborator in a module of its own, the hooks wiring
them together (a module imports only those listed before it):

- :class:`~.framework.Framework`: what differs between the two Lightning packages (errors, info, warnings);
- :mod:`~.arguments`: the constructor's arguments checked, the metrics selection and correction mode they give;
- :class:`~.announcements.Announcements`: the summary, then one line per membership change;
- :class:`~.follower.GroupFollower`: the group finder fed by the hooks (recording, analysis, verification, the
  trainable parameters stepped);
- :class:`~.tracked.TrackedModules`: the tracker of the verified, stepped modules, rebuilt when they change;
- :class:`~.metric_log.MetricLog`: the logging cadence, the loggers, the last values;
- :class:`~.invariance.InvarianceWatch`: measurement only, modules whose invariance is lost on some steps;
- :class:`~.checkpoint.CheckpointState`: verdicts and the AdamG rewrite's radii, saved and restored.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_sphere.correction.steering_options import Hyperball, Rotational
from lightning_sphere.integrations.lightning.arguments import (
    _check_optimizers,
)
from lightning_sphere.integrations.lightning.checkpoint import restore_steering_state
from lightning_sphere.integrations.lightning.framework import Framework
from lightning_sphere.integrations.lightning.metric_log import run_tags
from lightning_sphere.integrations.lightning.pieces import CallbackPieces
from lightning_sphere.integrations.strategies import check_model, flat_buffer_refusal
from lightning_sphere.optimizers.registry import unwrap_optimizer


class SphereMonitorLogic(CallbackPieces):
    """Measure the spherical dynamics of every normalized filter and stream them to the loggers.

    Finds the radially invariant groups of the model on the first training step (each output channel
    of a layer followed by BatchNorm or InstanceNorm, …), verifies them by gradient orthogonality, prints
    a summary, and keeps following training: a layer first called, or first trainable, later is examined
    then, and every change is announced once. Measures every logging step on the device: effective
    learning rate, angular update, radial and tangential updates, the Riemannian gradient and, for Adam,
    its deformation (docs/theory.md §2–§5, §7). Keys are ``sphere/<metric>/<module name>`` and ``sphere/<metric>/all``.

    Args:
        groups: which groups to track. ``"auto"``: every layer whose output only feeds a normalization
            (read off the first step's autograd graph) and every weight-normalized tensor; ``"numeric"``:
            every parameter of two or more dimensions whose gradient passes the orthogonality test, per
            output channel or else whole; or a mapping from module or parameter names to ``"channel"``,
            ``"layer"`` or a number of channels per group.
        log_every_n_steps: measure and log every this many optimizer steps; ``None`` follows
            ``Trainer(log_every_n_steps=...)``.
        histogram_every_n_steps: also log per-group histograms (TensorBoard only) every this many steps, a
            multiple of the logging cadence; ``None`` means every 10th logging step, ``0`` never.
        custom_scalars: write a TensorBoard custom-scalars layout: first the run's loss(es) and learning
            rate(s) as logged and one chart per metric over all groups (a line per run), then, collapsed, one chart
            per metric logged per layer (a line per layer); the same sphere charts for every run with the same
            ``metrics`` (so that runs compare chart by chart).
        metrics: the metrics to log (names of :data:`~lightning_sphere.METRICS`, or ``"skipped_groups"``);
            ``None``: all. Each is logged over all groups, ``sphere/<metric>/all``.
        per_layer: the metrics also logged per tracked module, ``sphere/<metric>/<module name>``: by default
            ``("effective_lr", "angular_update", "norm")``; ``True``: every logged metric; ``False``: none.
            The equilibrium angular update (§7) follows ``angular_update``, and is logged per module only when
            the modules' equilibria differ.
        tolerance: δ of the gradient test: a candidate module is tracked while ``max |cos(g, x)|`` over its
            groups on its first step is at most δ/√d, a share of what a random direction shows (d the group
            size; :func:`~lightning_sphere.core.tolerance.tolerance_for`). ``None``: 0.1 for candidates the graph or
            ``groups=`` vouches for, 0.01 for ``groups="numeric"`` ones. With the correction on, a module most
            of whose groups exceed it on a later step has lost its invariance and is not corrected again.
        spherical_correction: rewrite every step of the tracked groups into its spherical form (docs/theory.md
            §4, §6): ``True`` or ``"srt"`` (AdamSRT for Adam/AdamW, SGDMRT for SGD with momentum, the exact
            AdamG rewrite for SGD without), ``"s"`` (AdamS), ``"rt"`` (rescaling and transport only).
            Measurements then describe the corrected update. ``False`` (default) only measures.
        compile: run the fused per-row kernels compiled with ``torch.compile`` (seconds of compiling at the
            first step, then several times faster); ``None`` compiles on GPUs and for models with at least
            2**20 tracked entries.

    Raises:
        MisconfigurationException: for an argument of the wrong type or value (naming it, the type expected
            and the value); at setup for strategies that shard parameters into flat buffers (FSDP1, DeepSpeed);
            at fit start for DTensor parameters split other than by FSDP2's rows (tensor parallelism), for an
            optimizer or option the spherical correction cannot honour, or a param group whose
            lr·weight_decay ≥ 1 it could not undo.

    Example:

    >>> import torch
    >>> from torch import nn
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from pytorch_lightning import LightningModule, Trainer
    >>> from lightning_sphere import SphereMonitor
    >>> class Model(LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = nn.Sequential(
    ...             nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)
    ...         )
    ...     def training_step(self, batch, batch_idx):
    ...         return nn.functional.cross_entropy(self.net(batch[0]), batch[1])
    ...     def configure_optimizers(self):
    ...         return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    >>> _ = torch.manual_seed(0)
    >>> data = DataLoader(TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))), batch_size=16)
    >>> monitor = SphereMonitor(log_every_n_steps=1)
    >>> trainer = Trainer(max_steps=2, callbacks=[monitor], logger=False, enable_checkpointing=False,
    ...                   enable_progress_bar=False, enable_model_summary=False)
    >>> trainer.fit(Model(), data)
    >>> [(g.module_name, g.num_groups, g.group_size) for g in monitor.groups]  # one group per 3×3 filter
    [('net.0', 4, 9)]
    >>> round(monitor.metrics["sphere/angular_update_equilibrium/all"], 6)  # √(2ηλ/(1 + μ)), §7
    0.007255
    """

    _framework: Framework

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(trainer.strategy, self._framework.unsupported_strategies):
            raise self._framework.misconfiguration(flat_buffer_refusal(trainer.strategy))
        error = self._framework.misconfiguration
        cadence = self._log.cadence_for(trainer, error, self.log_every_n_steps, self.histogram_every_n_steps)
        self._follower.finder = None
        # a strategy that shards the model in configure_model: groups are looked for at fit start, once it did
        if not isinstance(trainer.strategy, self._framework.sharding_strategies):
            self._follower.find(trainer, pl_module, self.groups_spec, self.tolerance)
        self._log.follow(cadence)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if isinstance(trainer.strategy, self._framework.sharding_strategies):
            reason = check_model(pl_module)
            if reason:
                raise self._framework.misconfiguration(reason)
            if self._follower.finder is None:
                self._follower.find(trainer, pl_module, self.groups_spec, self.tolerance)
        _check_optimizers(self._framework.misconfiguration, trainer.optimizers, self.correction)
        self._tracked.close()
        self._invariance.restart()
        self._invariance.read_clipping(trainer)
        self._announcements.summarized = False
        self._follower.restart()
        self._log.check_loggers(trainer.loggers)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._tracked.hook_steps(trainer.optimizers)
        finder, checkpoint = self._follower.finder, self._checkpoint
        if checkpoint.resumed and self.correction is not None and finder is not None:
            checkpoint.resume_rewrite(finder.model, trainer.optimizers, self.correction)
        if isinstance(self.correction, Rotational | Hyperball):
            optimizers = [unwrap_optimizer(o) for o in trainer.optimizers]
            restore_steering_state(getattr(trainer, "ckpt_path", None), pl_module, optimizers)
        self._log.start(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Histograms of the last logged step, when fit ended before the cadence took them (early stopping,
        ``max_time``): one more device→host transfer, at the end of fit only; the layout with every key the run
        logged."""
        self._log.write_due_histograms(trainer.loggers, self._tracker)
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        self._log.write_layout(trainer.loggers, step, run_tags(trainer))  # with the tags written since

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        follower = self._follower
        if follower.finder is None:
            return
        if follower.follow_trainable(trainer.optimizers):
            self._update_tracker(trainer)
        follower.start_batch()
        if self._tracker is not None:
            self._log.arm(trainer, self._tracker)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Tensor) -> None:
        self._follower.analyze(loss)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        if self._follower.finder is None:
            return
        optimizer = unwrap_optimizer(optimizer)
        if self._follower.verify(trainer, optimizer, self._checkpoint.verdicts):
            self._update_tracker(trainer, optimizer)
        if self._tracker is not None:
            # The AdamG rewrite: what comes next (the LightningModule's hook, gradient clipping) sees plain SGD's
            # gradients; the tracker gives the stored weights theirs back when the update begins.
            self._tracker.to_real_gradients(optimizer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        follower = self._follower
        follower.end_batch()
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if self.correction is None:  # with the correction on, the tracker stops correcting such modules itself
            self._invariance.check_norms(step)
        measurement = None if self._tracker is None else self._tracker.collect()
        if measurement is not None:
            self._log.write(trainer.loggers, measurement, step, run_tags(trainer))
            if self.correction is None:
                compute_dtype = follower.found.compute_dtype  # a tracker measured: the finder built it
                self._invariance.check_gradients(step, measurement, self.groups, self.tolerance, compute_dtype)
        if follower.flipped_in_batch(trainer.optimizers):  # a flag flipped in training_step: say so now
            self._update_tracker(trainer)
        bar = getattr(trainer, "progress_bar_callback", None)
        self._tell(fresh_line=bar is not None and bool(getattr(bar, "is_enabled", False)))

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._follower.teardown()
        self._tracked.unhook_steps()
        if self._tracker is not None:
            # The model leaves fit as plain SGD would have it (the AdamG rewrite's real weights); the groups
            # stay inspectable.
            self._tracker.close()
        if stage == "fit":  # what a checkpoint restored was for this fit, not for the next model
            self._checkpoint.forget()

    def state_dict(self) -> dict[str, Any]:
        """The verification verdicts, by candidate (module, parameters, granularity: a resumed run reuses one
        only for the identical candidate), and the AdamG rewrite's virtual radii. The optimizer's own checkpoint
        carries the moments the correction rescales and transports; the model's holds the real weights under
        the AdamG rewrite (:meth:`~lightning_sphere.SphereTracker.radii`), from which a resumed run's rewrite
        goes on with these radii."""
        finder = self._follower.finder
        return self._checkpoint.state_dict({} if finder is None else finder.verdicts, self._tracker)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._checkpoint.load_state_dict(state_dict)

    # ------------------------------------------------------------------ wiring

    def _update_tracker(self, trainer: Any, stepping: torch.optim.Optimizer | None = None) -> None:
        """Track the verified modules that are trainable and stepped now, if that changed (a new tracker;
        ``stepping``: the optimizer whose step is under way, whose weights to copy now)."""
        clipping = "value" if self._invariance.value_clipping else None
        radii, correction, tolerance = self._checkpoint.radii, self.correction, self.tolerance
        if not self._tracked.update(
            trainer, radii, correction=correction, compile=self.compile, tolerance=tolerance, gradient_clipping=clipping
        ):
            return
        tracker = self._tracked.tracker
        assert tracker is not None  # update() returned True: it built one
        self._invariance.watch_norms(tracker.groups, self._follower.found.model)
        self._announcements.changed = True
        self._log.arm(trainer, tracker)
        if stepping is not None:
            tracker.snapshot(stepping)  # this step's pre-hook ran before the tracker existed
