"""Hugging Face ``transformers.Trainer``: :class:`SphereCallback`, the monitor as a ``TrainerCallback``.

Detection reads the graph of the first training step's forward pass (a forward hook on the model hands the
loss's graph to the :class:`~lightning_sphere.detection.finder.GroupFinder` before the backward pass frees it),
and verifies candidates on that step's gradients in ``on_pre_optimizer_step``, with the weights still x_k; the
:class:`~lightning_sphere.SphereTracker` is built there, so the step's own hooks measure (and, with
``spherical_correction``, correct) it. A step is measured when the Trainer will log it (``logging_steps``,
``logging_first_step``), collected in ``on_optimizer_step`` (one device→host transfer) and handed to every logger
the Trainer reports to in ``on_log``, under the same ``sphere/<metric>/<layer>`` keys as in Lightning, next to the
Trainer's loss and learning rate: the callback puts itself first among the Trainer's callbacks, so that the
reporting integrations (TensorBoard, W&B, …) see the keys it adds. Needs ``transformers`` ≥ 4.51 (the extra
``hf``), whose Trainer calls ``on_pre_optimizer_step`` and ``on_optimizer_step``.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from lightning_sphere.detection.finder import MAX_TRIES, GroupFinder
from lightning_sphere.integrations.lightning.arguments import _check_arguments, _correction, _selection
from lightning_sphere.optimizers.modes import cannot_invert, unsupported
from lightning_sphere.optimizers.registry import unwrap_optimizer
from lightning_sphere.reporting.layout import custom_scalars_layout, write_layout
from lightning_sphere.reporting.sinks import PER_LAYER
from lightning_sphere.reporting.summary import summarize
from lightning_sphere.tracking.tracker import SphereTracker

__all__ = ["SphereCallback"]

#: The class as the messages name it.
_NAME = "SphereCallback"


class SphereCallback(TrainerCallback):
    """Measure (and optionally correct) the steps of a ``transformers.Trainer`` on the sphere.

    Args:
        groups: ``"auto"`` (layers whose output only feeds a normalization, read off the first step's graph),
            ``"numeric"`` or a mapping, as for :class:`~lightning_sphere.lightning.SphereMonitor`.
        metrics: the metrics to log (``None``: all); ``per_layer``: those also logged per module (by default the
            effective learning rate, the angular update and the norm; the equilibrium goes with the angular update
            and needs a weight decay: ``TrainingArguments``' default is 0).
        spherical_correction: as for ``SphereMonitor`` (docs/theory.md §4–§6, §9).
        tolerance: δ of the gradient test (``None``: the detection's defaults).
        compile: run the kernels compiled (``None``: by size and device).

    Raises:
        ValueError: for an argument out of range, and, at the first step, for an optimizer or param group the
            correction cannot honour.
    """

    def __init__(
        self,
        groups: Any = "auto",
        metrics: Sequence[str] | None = None,
        per_layer: bool | Sequence[str] = PER_LAYER,
        spherical_correction: Any = False,
        tolerance: float | None = None,
        compile: bool | None = None,
    ) -> None:
        _check_arguments(
            ValueError, _NAME, groups=groups, tolerance=tolerance, compile=compile, metrics=metrics, per_layer=per_layer
        )
        self.groups_spec, self.tolerance, self.compile = groups, tolerance, compile
        self.selection = _selection(ValueError, metrics, per_layer, _NAME)
        self.correction = _correction(ValueError, spherical_correction, _NAME)
        self.finder: GroupFinder | None = None
        self.tracker: SphereTracker | None = None
        #: the last logged values (``sphere/…`` → float)
        self.metrics: dict[str, float] = {}
        self._pending: dict[str, float] | None = None
        self._hook: Any = None
        self._model: nn.Module | None = None
        self._summary = ""
        self._handler: Any = None
        self._layouts: dict[int, Any] = {}  # writer → the layout it has
        self._logged: dict[str, None] = {}  # the tags the Trainer's TensorBoard integration has written
        self._measured: set[str] = set()  # the metrics logged so far
        self._eager: Any = None

    # ------------------------------------------------------------------ set-up

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Put this callback first among the Trainer's, so that the reporting integrations' ``on_log`` sees the
        keys it adds (the Trainer appends user callbacks after its own)."""
        handler = self._handler = _calling_handler(self)
        if handler is not None:
            handler.callbacks.remove(self)
            handler.callbacks.insert(0, self)

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        if model is None:
            raise ValueError("SphereCallback needs the Trainer's model")
        optimizer = kwargs.get("optimizer")
        if self.correction is not None and optimizer is not None:
            inner = unwrap_optimizer(optimizer)
            reason = unsupported(inner, self.correction) or cannot_invert(inner, self.correction)
            if reason:
                raise ValueError(f"SphereCallback(spherical_correction=...): {reason}")
        self._model = model
        self.finder = GroupFinder(model, self.groups_spec, self.tolerance, _compute_dtype(args), MAX_TRIES)
        self.finder.start()
        self._hook = model.register_forward_hook(self._analyze)
        # ``torch_compile=True``: the first step runs eagerly, so that its layer calls and graph can be read
        self._eager = torch.compiler.set_stance("force_eager")

    def _analyze(self, module: nn.Module, inputs: Any, output: Any) -> None:
        """The first forward pass of training: its graph, while alive. Recording goes on through the backward pass
        when some layer ran without a graph (gradient checkpointing with ``use_reentrant=True``, the default of
        transformers before 5), whose forward the backward pass recomputes with one."""
        self._hook.remove()
        finder = self.finder
        assert finder is not None  # set with the hook
        root = _loss_of(output)
        if not finder.has_blind_calls():
            finder.stop()
        if root is not None and root.grad_fn is not None:
            finder.analyze([root])

    # ------------------------------------------------------------------ the steps

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Gradients ready, weights x_k: verify the candidates (first step), build the tracker, arm a logging step."""
        optimizer = kwargs.get("optimizer")
        finder = self.finder
        if finder is None or optimizer is None:
            return
        inner = unwrap_optimizer(optimizer)
        if self.tracker is None:
            if self._eager is not None:
                self._eager.__exit__(None, None, None)  # the compiler's stance as it was
                self._eager = None
            finder.analyze_recomputed()  # the layers a reentrant checkpoint ran without a graph, if any
            finder.finish()
            grads = {p: p.grad for p in finder.model.parameters() if p.grad is not None}
            finder.verify(grads)
            assert self._model is not None  # set at on_train_begin
            self.tracker = SphereTracker(
                finder.accepted, [inner], self.correction, self.compile, model=self._model, tolerance=self.tolerance
            )
            tracked = [e.module_name for e in self.tracker.groups]
            untracked = finder.untracked(tracked=tracked) | self.tracker.untracked
            self._summary = summarize(self.tracker.groups, self._model, untracked, self.tracker.corrections)
            if state.is_world_process_zero:
                print(self._summary, file=sys.stderr)
                self._warn_if_silent(args)
        if _logs_next(args, state):
            self.tracker.arm(histograms=False)

    def summary(self) -> str:
        """The table printed at the first step: what is tracked, and why every other layer is not."""
        return self._summary

    def _warn_if_silent(self, args: Any) -> None:
        """Say it when nothing will be logged: no group found, or a Trainer that never logs by steps."""
        if self.tracker is not None and not self.tracker.groups:
            warnings.warn(
                f"{_NAME} found no radially invariant group (a layer whose output only feeds a normalization: QK-norm "
                "heads, a layer before LayerNorm/RMSNorm or BatchNorm); training goes on unmonitored. The summary "
                "says why each layer is not tracked",
                stacklevel=3,
            )
        if str(getattr(args.logging_strategy, "value", args.logging_strategy)) != "steps":
            warnings.warn(
                f"{_NAME} measures the steps the Trainer logs by steps; with logging_strategy="
                f"{getattr(args.logging_strategy, 'value', args.logging_strategy)!r} nothing is measured. Use "
                'logging_strategy="steps" and logging_steps=N',
                stacklevel=3,
            )

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.tracker is not None and (measurement := self.tracker.collect()) is not None:
            self._pending = self.selection(measurement).scalars

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        """Add the measured step's metrics to what every reporting integration logs at this step."""
        if logs is not None and "train_runtime" not in logs:  # not the one-point summary of a finished run
            self._logged.update(dict.fromkeys(_tensorboard_tag(k) for k, v in logs.items() if _is_scalar(v)))
        if self._pending is not None and logs is not None and "loss" in logs:
            logs.update(self._pending)
            self.metrics, self._pending = dict(self._pending), None
        if logs is not None:
            self._write_layout(state.global_step)

    def _write_layout(self, step: int) -> None:
        """The custom-scalars layout, to each TensorBoard writer of the Trainer whose layout it changes (its
        integration logs the training values under ``train/``, the evaluation's under ``eval/``)."""
        self._measured |= {key.split("/")[1] for key in self.metrics}
        metrics = [m for m in self.selection.metrics if m in self._measured]  # no chart stays empty
        layout = custom_scalars_layout(metrics, self.selection.per_layer, "train/", self._logged)
        for callback in getattr(self._handler, "callbacks", ()):
            writer = getattr(callback, "tb_writer", None)
            if writer is not None and self._layouts.get(id(writer)) != layout and hasattr(writer, "add_custom_scalars"):
                write_layout(writer, layout, step)
                self._layouts[id(writer)] = layout

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._eager is not None:
            self._eager.__exit__(None, None, None)
            self._eager = None
        if self._hook is not None:
            self._hook.remove()
        if self.tracker is not None:
            self.tracker.close()
        if self.finder is not None:
            self.finder.finish()


def _logs_next(args: Any, state: Any) -> bool:
    """Whether the step under way (``state.global_step`` + 1) is one the Trainer logs."""
    if str(getattr(args.logging_strategy, "value", args.logging_strategy)) != "steps":
        return False
    step = state.global_step + 1
    every = args.logging_steps
    every = max(1, int(every * state.max_steps)) if isinstance(every, float) and every < 1 else int(every)
    return step % every == 0 or (step == 1 and bool(args.logging_first_step))


def _loss_of(output: Any) -> Tensor | None:
    """The loss of a model's output (a ``ModelOutput`` or a tuple), else its first tensor that has a graph."""
    loss = getattr(output, "loss", None) if not isinstance(output, tuple | list) else None
    if isinstance(loss, Tensor):
        return loss
    values = output.values() if hasattr(output, "values") else output if isinstance(output, tuple | list) else [output]
    return next((v for v in values if isinstance(v, Tensor) and v.grad_fn is not None), None)


def _tensorboard_tag(key: str) -> str:
    """The tag Hugging Face's TensorBoard integration writes a logged key under (its ``rewrite_logs``)."""
    for phase in ("eval", "test"):
        if key.startswith(f"{phase}_"):
            return f"{phase}/{key[len(phase) + 1 :]}"
    return f"train/{key}"


def _is_scalar(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _compute_dtype(args: Any) -> torch.dtype | None:
    return torch.bfloat16 if getattr(args, "bf16", False) else torch.float16 if getattr(args, "fp16", False) else None


def _calling_handler(callback: TrainerCallback) -> Any:
    """The ``CallbackHandler`` dispatching the current event to ``callback`` (found on the call stack)."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if type(owner).__name__ == "CallbackHandler" and callback in getattr(owner, "callbacks", ()):
            return owner
        frame = frame.f_back  # type: ignore[assignment]
    return None
