"""The SphereMonitor callback logic, shared by the ``pytorch_lightning`` and ``lightning.pytorch`` classes.

Hook order this relies on (Lightning 2.x, see the developers' notes): a batch whose forward passes are
recorded (the first, and any that may call a layer not analysed yet) has the graph of each of its backward
passes analysed in ``on_before_backward`` (a backward Lightning does not see is caught at the optimizer
step); candidates are verified on the gradients of ``on_before_optimizer_step`` (weights still ``x_k``);
the torch optimizer step hooks measure armed steps (they do not fire on AMP-skipped steps);
``on_train_batch_end`` collects and logs at Lightning's own step and cadence. ``on_train_batch_start``
compares the set of trainable parameters the optimizers step with the last batch's (a Python pass over
their flags): when it changed, layers are examined again and the tracker is rebuilt.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_sphere.core.groups import InvariantGroups
from lightning_sphere.detection.finder import GroupFinder
from lightning_sphere.integrations.lightning.arguments import (
    _check_arguments,
    _check_optimizers,
    _correction,
    _selection,
)
from lightning_sphere.integrations.lightning.checkpoint import CheckpointState
from lightning_sphere.integrations.lightning.framework import Framework
from lightning_sphere.integrations.lightning.invariance import InvarianceWatch
from lightning_sphere.integrations.lightning.metric_log import MetricLog
from lightning_sphere.integrations.strategies import check_model, cut_by_shards, flat_buffer_refusal, rebind
from lightning_sphere.optimizers.registry import unwrap_optimizer
from lightning_sphere.reporting.sinks import PER_LAYER
from lightning_sphere.reporting.summary import summarize
from lightning_sphere.tracking.probe import after_closure
from lightning_sphere.tracking.tracker import SphereTracker

#: Steps a candidate may show a gradient that cannot judge it (zero or not finite: AMP skips the first few)
#: before it is dropped. Steps on which it gets no gradient at all (a branch not used yet) do not count.
MAX_VERIFICATION_STEPS = 50


class SphereMonitorLogic:
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
        custom_scalars: write a TensorBoard custom-scalars layout with one multi-line chart per metric, the same
            for every run with the same ``metrics`` (so that runs compare chart by chart).
        metrics: the metrics to log (names of :data:`~lightning_sphere.METRICS`, or ``"skipped_groups"``);
            ``None``: all. Each is logged over all groups, ``sphere/<metric>/all``.
        per_layer: the metrics also logged per tracked module, ``sphere/<metric>/<module name>``: by default
            ``("effective_lr", "angular_update", "norm")``; ``True``: every logged metric; ``False``: none.
            The equilibrium angular update (§7) follows ``angular_update``, and is logged per module only when
            the modules' equilibria differ.
        tolerance: δ of the gradient test: a candidate module is tracked while ``max |cos(g, x)|`` over its
            groups on its first step is at most δ/√d, a share of what a random direction shows (d the group
            size; :func:`~lightning_sphere.groups.tolerance_for`). ``None``: 0.1 for candidates the graph or
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
        error = self._framework.misconfiguration
        _check_arguments(
            error,
            groups=groups,
            log_every_n_steps=log_every_n_steps,
            histogram_every_n_steps=histogram_every_n_steps,
            custom_scalars=custom_scalars,
            tolerance=tolerance,
            compile=compile,
            metrics=metrics,
            per_layer=per_layer,
        )
        self.selection = _selection(error, metrics, per_layer)
        self.groups_spec = groups
        self.correction = _correction(error, spherical_correction)
        self.compile = compile
        self.log_every_n_steps = log_every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self.tolerance = tolerance
        self._log = MetricLog(self.selection, custom_scalars, self._framework.warn)
        self._finder: GroupFinder | None = None
        self._tracker: SphereTracker | None = None
        self._tracker_input: list[str] = []  # the modules the tracker was built for
        self._recording = False
        self._record_next = True  # some trainable layer's structure is not known yet
        self._eager_next = True  # run the next recorded step eagerly (torch.compile)
        self._eager: Any = None  # the compiler's stance to restore
        self._backward_seen = False
        self._warned_direct_backward = False
        self._summarized = False
        self._steps_seen = 0
        self._stepped_in_batch: set[Any] = set()
        # The trainable parameters the optimizers step (→ which one), as at the start of the batch (a
        # toggle_optimizer freezes some during a step), and what they looked like at the last check: when
        # that changes (a layer unfrozen, a param group added), layers are examined again.
        self._stepped: dict[Tensor, Any] = {}
        self._signature: tuple[Any, ...] | None = None
        self._signatures = _Signature()
        self._changed = False  # membership may have changed on this batch: announce at its end
        self._announced: dict[str, str] = {}  # module → "tracked" or why not, as last told
        self._invariance = InvarianceWatch(self._framework)
        self._step_hooks: list[Any] = []
        self._checkpoint = CheckpointState()

    @property
    def groups(self) -> list[InvariantGroups]:
        """The tracked modules, once found (after the first training step)."""
        return [] if self._tracker is None else list(self._tracker.groups)

    @property
    def metrics(self) -> dict[str, float]:
        """The last logged values, with the loggers' keys."""
        return dict(self._log.metrics)

    def summary(self) -> str:
        """The table printed at the start of training: tracked modules, and every other layer with the reason
        it is not tracked now; tracked modules whose invariance was lost later (measurement only)."""
        if self._finder is None:
            return "lightning_sphere: no training step seen yet"
        corrections = {} if self._tracker is None else self._tracker.corrections
        text = summarize(self.groups, self._finder.model, self._untracked(), corrections)
        return text + self._invariance.summary_sections()

    def _untracked(self) -> dict[str, str]:
        tracked = {g.module_name for g in self.groups}
        untracked = self._finder.untracked(self._stepped if self._signature is not None else None, tracked)
        if self._tracker is not None:
            untracked |= self._tracker.untracked
        return untracked

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(trainer.strategy, self._framework.unsupported_strategies):
            raise self._framework.misconfiguration(flat_buffer_refusal(trainer.strategy))
        error = self._framework.misconfiguration
        cadence = self._log.cadence_for(trainer, error, self.log_every_n_steps, self.histogram_every_n_steps)
        self._finder = None
        if not isinstance(trainer.strategy, self._framework.sharding_strategies):
            self._find_groups(trainer, pl_module)  # else at fit start, once configure_model has sharded it
        self._log.follow(cadence)

    def _find_groups(self, trainer: Any, pl_module: Any) -> None:
        try:
            self._finder = GroupFinder(
                pl_module, self.groups_spec, self.tolerance, _compute_dtype(trainer), MAX_VERIFICATION_STEPS
            )
        except ValueError as err:
            raise self._framework.misconfiguration(f"SphereMonitor(groups=...): {err}") from err

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if isinstance(trainer.strategy, self._framework.sharding_strategies):
            reason = check_model(pl_module)
            if reason:
                raise self._framework.misconfiguration(reason)
            if self._finder is None:
                self._find_groups(trainer, pl_module)
        _check_optimizers(self._framework.misconfiguration, trainer.optimizers, self.correction)
        self._close_tracker()
        self._invariance.read_clipping(trainer)
        self._summarized = False
        self._signature = None
        self._record_next = self._eager_next = True
        self._steps_seen = 0
        self._log.check_loggers(trainer.loggers)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._remove_step_hooks()
        self._step_hooks = [opt.register_step_pre_hook(self._before_step) for opt in trainer.optimizers]
        finder, checkpoint = self._finder, self._checkpoint
        if checkpoint.resumed and self.correction is not None and finder is not None:
            checkpoint.resume_rewrite(finder.model, trainer.optimizers, self.correction)
        self._log.start(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Histograms of the last logged step, when fit ended before the cadence took them (early stopping,
        ``max_time``): one more device→host transfer, at the end of fit only."""
        self._log.write_due_histograms(trainer.loggers, self._tracker)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        finder = self._finder
        if finder is None:
            return
        self._follow_trainable(trainer)
        self._stepped_in_batch = set()
        if self._record_next:
            finder.start()  # record this batch's forward passes: every backward pass of it is analyzed
            self._recording, self._backward_seen = True, False
            if self._eager_next:
                # torch.compile'd code would skip the recording hooks (a model compiled earlier) or break its
                # graphs at them for good: this one step runs eagerly, later ones compile without the hooks.
                self._eager_next = False
                self._eager = torch.compiler.set_stance("force_eager")
        if self._tracker is not None:
            self._log.arm(trainer, self._tracker)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Tensor) -> None:
        if self._recording:
            self._finder.analyze([loss])
            self._backward_seen = self._changed = True

    def _before_step(
        self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """A step pre-hook on every optimizer, for the steps in which a tracker may be built (a recorded step,
        or candidates pending): one built in ``on_before_optimizer_step`` missed this step's pre-hook, which reads
        the gradients after the closure (Lightning's training step, backward and clipping); this does instead.
        Under AMP the closure has run before the step, and such a tracker's own pre-hook reads them."""
        if self._finder is None or not (self._recording or self._finder.pending):
            return None

        def read() -> None:
            if self._tracker is not None:
                self._tracker.gradients_ready(optimizer)

        return after_closure(args, kwargs, read)

    def _remove_step_hooks(self) -> None:
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        if self._finder is None:
            return
        optimizer = unwrap_optimizer(optimizer)
        self._verify(trainer, optimizer)
        if self._tracker is not None:
            # The AdamG rewrite: what comes next (the LightningModule's hook, gradient clipping) sees plain SGD's
            # gradients; the tracker gives the stored weights theirs back when the update begins.
            self._tracker.to_real_gradients(optimizer)

    def _verify(self, trainer: Any, optimizer: torch.optim.Optimizer) -> None:
        """Read what the step's graphs hold, and test the pending candidates on the step's gradients."""
        finder = self._finder
        self._steps_seen += 1
        if self._recording and not self._backward_seen and finder.has_layer_calls():
            self._read_unseen_backward()
        if self._recording and finder.analyze_recomputed():
            self._changed = True
        if not finder.pending:
            return
        if isinstance(trainer.strategy, self._framework.sharding_strategies):
            # FSDP2: the graph was read while some layers held unsharded copies of their parameters
            finder.pending = rebind(finder.pending, finder.model)
            for entry, why in cut_by_shards(finder.pending):
                finder.reject([entry], why)
                self._framework.warn(f"SphereMonitor: {entry.module_name} is not tracked: {why}")
        before = len(finder.accepted)
        if self._checkpoint.verdicts:
            finder.restore(self._checkpoint.verdicts)
        # Only modules of optimizers that have not stepped yet in this batch: after its step, an optimizer's
        # gradients no longer belong to its weights.
        stepped_before, self._stepped_in_batch = self._stepped_in_batch, self._stepped_in_batch | {optimizer}
        entries = [
            e
            for e in finder.pending
            if all(p.requires_grad and p in self._stepped and self._stepped[p] not in stepped_before for p in e.params)
        ]
        grads = {p: p.grad for entry in entries for p in entry.params if p.grad is not None}
        if grads:  # else nothing to decide on this step: no host sync
            for entry in finder.verify(grads, entries):
                self._framework.warn(
                    f"SphereMonitor: {entry.module_name} is not tracked: {finder.rejected[entry.module_name]}"
                )
                self._announced[entry.module_name] = finder.rejected[entry.module_name]
            self._changed = True
        if len(finder.accepted) != before or grads:
            self._update_tracker(trainer, optimizer)

    def _follow_trainable(self, trainer: Any) -> None:
        """Re-examine when the set of trainable parameters the optimizers step changed: one pass over their
        flags, a cheap Python check, at the start of a batch and at its end (``training_step`` may flip them)."""
        signature = self._signatures(trainer.optimizers)
        if signature == self._signature:
            return
        if self._signature is not None:
            self._finder.reexamine()
            self._record_next = self._eager_next = True
        self._signature = signature
        self._stepped = {
            p: opt for opt in trainer.optimizers for g in opt.param_groups for p in g["params"] if p.requires_grad
        }
        self._changed = True
        self._update_tracker(trainer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        finder = self._finder
        if self._recording:
            finder.finish()
            self._recording = False
            self._record_next = bool(finder.unseen_layers())
        self._compile_again()
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if self.correction is None:  # with the correction on, the tracker stops correcting such modules itself
            self._invariance.check_norms(step)
        measurement = None if self._tracker is None else self._tracker.collect()
        if measurement is not None:
            self._log.write(trainer.loggers, measurement, step)
            if self.correction is None:
                compute_dtype = finder.compute_dtype
                self._invariance.check_gradients(step, measurement, self.groups, self.tolerance, compute_dtype)
        if finder is not None and self._signature is not None:
            self._follow_trainable(trainer)  # a flag flipped in training_step: the summary says so now
        if finder is None or not self._changed:
            return
        if not self._summarized:
            if finder.analyzed and self._steps_seen and not finder.retrying:  # else wait for the verdicts
                self._summarized, self._changed = True, False
                self._announced = self._statuses()
                self._report()
        else:
            self._changed = False
            self._announce()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._compile_again()
        if self._finder is not None:
            self._finder.finish()
        self._recording = False
        self._remove_step_hooks()
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
        finder = self._finder
        return self._checkpoint.state_dict({} if finder is None else finder.verdicts, self._tracker)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._checkpoint.load_state_dict(state_dict)

    # ------------------------------------------------------------------ helpers

    def _compile_again(self) -> None:
        if self._eager is not None:
            self._eager.__exit__(None, None, None)  # the compiler's stance as it was
            self._eager = None

    def _close_tracker(self, release: bool = True) -> None:
        if self._tracker is not None:
            self._tracker.close(release)
            self._tracker = None
        self._tracker_input = []

    def _update_tracker(self, trainer: Any, stepping: torch.optim.Optimizer | None = None) -> None:
        """Track the verified modules that are trainable and stepped now, if that changed (a new tracker;
        ``stepping``: the optimizer whose step is under way, whose weights to copy now)."""
        finder = self._finder
        eligible = [e for e in finder.accepted if finder.eligible(e, self._stepped)]
        if self._tracker is not None and [e.module_name for e in eligible] == self._tracker_input:
            return
        if self._tracker is None and not eligible:
            return
        radii = self._checkpoint.radii | (self._tracker.radii() if self._tracker is not None else {})
        self._close_tracker(release=False)  # the radii go on in the new tracker
        accepted = _agree_across_ranks(trainer, eligible) if self.correction else eligible
        try:
            self._tracker = SphereTracker(
                accepted,
                trainer.optimizers,
                self.correction,
                self.compile,
                model=finder.model,
                tolerance=self.tolerance,
                compute_dtype=finder.compute_dtype,
                warn=self._framework.warn,
                gradient_clipping="value" if self._invariance.value_clipping else None,
            )
        except ValueError as err:
            raise self._framework.misconfiguration(f"SphereMonitor(spherical_correction=...): {err}") from err
        self._tracker_input = [e.module_name for e in eligible]
        self._tracker.load_radii(radii)
        self._invariance.watch_norms(self._tracker.groups, finder.model)
        self._changed = True
        self._log.arm(trainer, self._tracker)
        if stepping is not None:
            self._tracker.snapshot(stepping)  # this step's pre-hook ran before the tracker existed

    def _read_unseen_backward(self) -> None:
        """A backward pass ran that Lightning did not announce (``loss.backward()`` in manual optimization):
        read the layers off the graph up to the recorded modules' outputs, and say how to do better."""
        self._finder.analyze_outputs()
        self._changed = True
        if not self._warned_direct_backward:
            self._warned_direct_backward = True
            self._framework.warn(
                "SphereMonitor: an optimizer stepped after a backward pass that Lightning did not run "
                "(`loss.backward()` in manual optimization?), so the loss's graph could not be read. Layers were "
                "found from the graph up to the modules' own outputs instead; a use of a layer's output that "
                "bypasses every layer and normalization is missed there (the gradient test still catches what it "
                "breaks). Call `self.manual_backward(loss)` instead of `loss.backward()`."
            )

    def _statuses(self) -> dict[str, str]:
        return {g.module_name: "tracked" for g in self.groups} | self._untracked()

    def _announce(self) -> None:
        """One line per module whose membership changed since the last announcement."""
        now = self._statuses()
        for name, status in now.items():
            before = self._announced.get(name)
            if status == before or status == "waiting for a gradient to verify it":
                continue
            if status == "tracked":
                entry = next(g for g in self.groups if g.module_name == name)
                norm = f"{entry.norm_name} ({entry.norm_type})" if entry.norm_name else entry.norm_type
                self._framework.info(
                    f"SphereMonitor: now tracking {name}: {entry.num_groups} groups of {entry.group_size} "
                    f"({entry.granularity}), {norm}"
                )
            elif before == "tracked":
                self._framework.info(f"SphereMonitor: {name} is not tracked any more: {status}")
            else:
                self._framework.info(f"SphereMonitor: {name} is not tracked: {status}")
            self._announced[name] = status

    def _report(self) -> None:
        if self.groups:
            self._framework.info(self.summary())
        else:
            self._framework.warn(
                "SphereMonitor found no radially invariant group (a Conv/Linear layer whose output only feeds "
                "a normalization in training mode); training continues unmonitored.\n" + self.summary()
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
            "SphereMonitor(groups={...}) to name them explicitly"
        )
    return [mine[n] for n in names]


def _compute_dtype(trainer: Any) -> torch.dtype | None:
    """The 16-bit dtype gradients are computed in under the Trainer's precision, if any."""
    precision = str(trainer.precision)
    return torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else None
