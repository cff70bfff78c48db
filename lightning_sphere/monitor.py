"""The SphereMonitor callback logic, shared by the ``pytorch_lightning`` and ``lightning.pytorch`` classes.

Hook order this relies on (Lightning 2.x, see the developers' notes): the first training batch's
forward pass is recorded and its loss graph analysed in ``on_before_backward``; candidates are
verified on the gradients of ``on_before_optimizer_step`` (weights still ``x_k``); the torch optimizer
step hooks measure armed steps (they do not fire on AMP-skipped steps); ``on_train_batch_end`` collects
and logs at Lightning's own step and cadence.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_sphere.detect import GroupFinder
from lightning_sphere.groups import InvariantGroups
from lightning_sphere.schemes import MODES, cannot_invert, correction_mode, unsupported
from lightning_sphere.sinks import LoggerSink
from lightning_sphere.summary import summarize
from lightning_sphere.tracker import UNOPTIMIZED, SphereTracker

#: Steps a candidate may wait for a finite, non-zero gradient (AMP skips the first few) before it is dropped.
MAX_VERIFICATION_STEPS = 50


@dataclass(frozen=True)
class Framework:
    """What differs between the two Lightning packages."""

    misconfiguration: type[Exception]
    info: Callable[[str], None]
    warn: Callable[[str], None]
    unsupported_strategies: tuple[type, ...]


class SphereMonitorLogic:
    """Measure the spherical dynamics of every normalized filter and stream them to the loggers.

    Finds the radially invariant groups of the model on the first training step (each output channel
    of a layer followed by BatchNorm or InstanceNorm, …), verifies them by gradient orthogonality, prints
    a summary, then measures every logging step on the device: effective learning rate, angular update,
    radial and tangential updates, the Riemannian gradient and, for Adam, its deformation (THEORY.md
    §2–§5, §7). Keys are ``sphere/<metric>/<module name>`` and ``sphere/<metric>/all``.

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
        custom_scalars: write a TensorBoard custom-scalars layout with one multi-line chart per metric.
        tolerance: δ of the gradient test: a candidate module is tracked while ``max |cos(g, x)|`` over its
            groups on its first step is at most δ/√d, a share of what a random direction shows (d the group
            size; :func:`~lightning_sphere.groups.tolerance_for`). ``None``: 0.1 for candidates the graph or
            ``groups=`` vouches for, 0.01 for ``groups="numeric"`` ones. With the correction on, a module most
            of whose groups exceed it on a later step has lost its invariance and is not corrected again.
        spherical_correction: rewrite every step of the tracked groups into its spherical form (THEORY.md
            §4, §6): ``True`` or ``"srt"`` (AdamSRT for Adam/AdamW, SGDMRT for SGD with momentum, the exact
            AdamG rewrite for SGD without), ``"s"`` (AdamS), ``"rt"`` (rescaling and transport only).
            Measurements then describe the corrected update. ``False`` (default) only measures.
        compile: run the fused per-row kernels compiled with ``torch.compile`` (seconds of compiling at the
            first step, then several times faster); ``None`` compiles on GPUs and for models with at least
            2**20 tracked entries.

    Raises:
        MisconfigurationException: for an argument of the wrong type or value (naming it, the type expected
            and the value); at setup for strategies that shard parameters into flat buffers (FSDP1, DeepSpeed)
            or into DTensors (ModelParallelStrategy); at fit start for an optimizer or option the spherical
            correction cannot honour, or a param group whose lr·weight_decay ≥ 1 it could not undo.

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
    ) -> None:
        _check_arguments(
            self._framework.misconfiguration,
            groups=groups,
            log_every_n_steps=log_every_n_steps,
            histogram_every_n_steps=histogram_every_n_steps,
            custom_scalars=custom_scalars,
            tolerance=tolerance,
            compile=compile,
        )
        error = self._framework.misconfiguration
        self.groups_spec = groups
        try:
            self.correction = correction_mode(spherical_correction)
        except ValueError:
            raise error(
                f"SphereMonitor(`spherical_correction`) must be True, False or one of {MODES}, got "
                f"{spherical_correction!r} ({type(spherical_correction).__name__})"
            ) from None
        self.compile = compile
        self.log_every_n_steps = log_every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self.tolerance = tolerance
        self._sink = LoggerSink(custom_scalars)
        self._metrics: dict[str, float] = {}
        self._finder: GroupFinder | None = None
        self._tracker: SphereTracker | None = None
        self._recording = False
        self._summarized = False
        self._verification_steps = 0
        self._cadence = (0, 0)
        # Restored from a checkpoint: the verification verdicts (so that a resumed run tracks the same
        # groups) and the AdamG rewrite's virtual radii.
        self._verdicts: tuple[dict[str, float], dict[str, str]] = ({}, {})
        self._radii: dict[str, Tensor] = {}

    @property
    def groups(self) -> list[InvariantGroups]:
        """The tracked modules, once found (after the first training step)."""
        return [] if self._tracker is None else list(self._tracker.groups)

    @property
    def metrics(self) -> dict[str, float]:
        """The last logged values, with the loggers' keys."""
        return dict(self._metrics)

    def summary(self) -> str:
        """The table printed at the start of training: tracked modules, and those left out with the reason."""
        if self._finder is None:
            return "lightning_sphere: no training step seen yet"
        untracked = dict(self._finder.rejected)
        untracked |= {g.module_name: "waiting for a gradient to verify it" for g in self._finder.pending}
        corrections = {}
        if self._tracker is not None:
            untracked |= self._tracker.untracked
            corrections = self._tracker.corrections
        return summarize(self.groups, self._finder.model, untracked, corrections)

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        error = self._framework.misconfiguration
        if isinstance(trainer.strategy, self._framework.unsupported_strategies):
            raise error(
                f"SphereMonitor does not support {type(trainer.strategy).__name__}: it shards parameters so "
                "that a filter's entries are not one row on one device. Use DDP (`strategy='ddp'`) or a "
                "single device, or remove SphereMonitor from the callbacks."
            )
        every = self.log_every_n_steps or trainer.log_every_n_steps
        hist = self.histogram_every_n_steps
        hist = 10 * every if hist is None else hist
        if every and hist % every:
            raise error(
                f"`histogram_every_n_steps={hist}` must be a multiple of the logging cadence ({every} steps), "
                "since histograms are taken on logging steps; or 0 to turn them off."
            )
        try:
            self._finder = GroupFinder(pl_module, self.groups_spec, self.tolerance, _compute_dtype(trainer))
        except ValueError as err:
            raise error(f"SphereMonitor(groups=...): {err}") from err
        if not every:
            self._framework.warn(
                "SphereMonitor: `log_every_n_steps=0` on the Trainer turns logging off; nothing is measured."
            )
        self._cadence = (every, hist)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.correction is not None:
            for optimizer in trainer.optimizers:
                reason = unsupported(optimizer, self.correction) or cannot_invert(optimizer, self.correction)
                if reason:
                    raise self._framework.misconfiguration(f"SphereMonitor(spherical_correction=...): {reason}")
        self._verification_steps = 0
        self._close_tracker()
        self._summarized = False
        if not trainer.loggers:
            self._framework.warn(
                "SphereMonitor: the Trainer has no logger; metrics are still measured and kept in "
                "`SphereMonitor.metrics`. Pass `logger=TensorBoardLogger(...)` to see them in charts."
            )

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._finder is not None and not self._finder.analyzed:
            self._finder.start()  # record this batch's forward passes, until one reaches a backward
            self._recording = True
        if self._tracker is not None:
            self._arm(trainer)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Tensor) -> None:
        if self._recording:
            self._finder.analyze([loss])

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        finder = self._finder
        if finder is None or not finder.pending:
            return
        finder.restore(*self._verdicts)
        stepped = {p for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        finder.reject([e for e in finder.pending if not all(p in stepped for p in e.params)], UNOPTIMIZED)
        grads = {p: p.grad for entry in finder.pending for p in entry.params if p.grad is not None}
        waiting = len(finder.pending)
        for entry in finder.verify(grads):
            self._framework.warn(
                f"SphereMonitor: {entry.module_name} is not tracked: {finder.rejected[entry.module_name]}"
            )
        self._verification_steps += 1
        if finder.pending and self._verification_steps >= MAX_VERIFICATION_STEPS:
            finder.reject(finder.pending, f"no usable gradient to verify it in {MAX_VERIFICATION_STEPS} steps")
        if len(finder.pending) == waiting and self._tracker is not None:
            return  # nothing decided on this step
        radii = self._radii | self.state_dict()["radii"]
        self._close_tracker(release=False)  # the radii go on in the new tracker
        accepted = _agree_across_ranks(trainer, finder.accepted) if self.correction else finder.accepted
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
            )
        except ValueError as err:
            raise self._framework.misconfiguration(f"SphereMonitor(spherical_correction=...): {err}") from err
        self._tracker.load_state_dict(radii)
        self._arm(trainer)
        self._tracker.snapshot(optimizer)  # this step's pre-hook ran before the groups were known

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._recording:
            self._finder.stop()
            self._recording = False
        if not self._summarized and self._finder is not None and self._finder.done:
            self._summarized = True
            self._report()
        measurement = None if self._tracker is None else self._tracker.collect()
        if measurement is not None:
            self._metrics = measurement.scalars
            self._sink.write(trainer.loggers, measurement, trainer.fit_loop.epoch_loop._batches_that_stepped)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._finder is not None:
            self._finder.stop()
        self._recording = False
        if self._tracker is not None:
            # The model leaves fit as plain SGD would have it (the AdamG rewrite's real weights); the groups
            # stay inspectable.
            self._tracker.close()
        if stage == "fit":  # what a checkpoint restored was for this fit, not for the next model
            self._verdicts, self._radii = ({}, {}), {}

    def state_dict(self) -> dict[str, Any]:
        """Which modules were tracked or left out, and the AdamG rewrite's virtual radii (the optimizer's
        own checkpoint carries the moments the correction rescales and transports)."""
        accepted, rejected = self._verdicts
        if self._finder is not None:
            accepted = accepted | {g.module_name: g.cosine for g in self._finder.accepted}
            rejected = rejected | self._finder.rejected
        radii = self._radii | (self._tracker.state_dict() if self._tracker is not None else {})
        return {"accepted": accepted, "rejected": rejected, "radii": radii}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._verdicts = (dict(state_dict.get("accepted", {})), dict(state_dict.get("rejected", {})))
        self._radii = dict(state_dict.get("radii", {}))

    # ------------------------------------------------------------------ helpers

    def _arm(self, trainer: Any) -> None:
        every, hist = self._cadence
        step = trainer.fit_loop.epoch_loop._batches_that_stepped + 1  # the step this batch will log at, plus one
        if every and step % every == 0:
            self._tracker.arm(histograms=bool(hist) and step % hist == 0)
        else:
            self._tracker.disarm()

    def _close_tracker(self, release: bool = True) -> None:
        if self._tracker is not None:
            self._tracker.close(release)
            self._tracker = None

    def _report(self) -> None:
        if self.groups:
            self._framework.info(self.summary())
        else:
            self._framework.warn(
                "SphereMonitor found no radially invariant group (a Conv/Linear layer whose output only feeds "
                "a normalization in training mode); training continues unmonitored.\n" + self.summary()
            )


def _check_arguments(error: type[Exception], **arguments: Any) -> None:
    """Raise ``error`` naming the argument, the expected type and the value, for a value of the wrong type or
    range. Bools are not taken for numbers."""
    expected = {
        "groups": (
            '"auto", "numeric" or a dict of module or parameter names to "channel", "layer" or a positive int',
            _valid_groups_spec,
        ),
        "log_every_n_steps": ("a positive int or None", lambda v: v is None or (_is_int(v) and v >= 1)),
        "histogram_every_n_steps": (
            "an int >= 0 (0 turns histograms off) or None",
            lambda v: v is None or (_is_int(v) and v >= 0),
        ),
        "custom_scalars": ("a bool", lambda v: isinstance(v, bool)),
        "tolerance": ("a float in (0, 1) or None", lambda v: v is None or (_is_real(v) and 0 < v < 1)),
        "compile": ("a bool or None", lambda v: v is None or isinstance(v, bool)),
    }
    for name, value in arguments.items():
        what, valid = expected[name]
        if not valid(value):
            raise error(f"SphereMonitor(`{name}`) must be {what}, got {value!r} ({type(value).__name__})")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _valid_groups_spec(value: Any) -> bool:
    if isinstance(value, str):
        return value in ("auto", "numeric")
    if not isinstance(value, Mapping):
        return False
    return all(isinstance(k, str) and (v in ("channel", "layer") or (_is_int(v) and v > 0)) for k, v in value.items())


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
