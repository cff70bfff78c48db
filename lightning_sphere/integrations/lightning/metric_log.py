"""What is measured when, and what reaches the loggers: the logging and histogram cadence at Lightning's own step,
the selected keys, the last values logged."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from lightning_sphere.integrations.lightning.arguments import _cadence_mismatch
from lightning_sphere.reporting.sinks import LoggerSink, RunTags, Selection
from lightning_sphere.tracking.tracker import Measurement, SphereTracker


class MetricLog:
    """Arms the tracker on the steps to log, and writes what it measured to the Trainer's loggers.

    Steps are counted as Lightning logs them (``fit_loop.epoch_loop._batches_that_stepped``); the last step of fit
    is measured too, when the Trainer knows it, so that charts end where training ends and :attr:`metrics` holds
    values after any fit of at least one step.
    """

    def __init__(self, selection: Selection, custom_scalars: bool, warn: Callable[[str], None]) -> None:
        self._selection = selection
        self._warn = warn
        self._sink = LoggerSink(custom_scalars, selection)
        #: the last logged values, with the loggers' keys
        self.metrics: dict[str, float] = {}
        #: (log every, histograms every) in optimizer steps; 0: never
        self.cadence = (0, 0)
        self._last_step: int | None = None  # the step fit ends at, when the Trainer knows it
        self._histogram_due: int | None = None  # the last logged step, if its histograms were not written

    def cadence_for(self, trainer: Any, error: type[Exception], every: int | None, hist: int | None) -> tuple[int, int]:
        """The cadence under ``trainer`` of the monitor's ``log_every_n_steps`` (``None``: the Trainer's) and
        ``histogram_every_n_steps`` (``None``: every 10th logging step); histograms never when no histogrammed
        metric is selected. ``error`` if histograms would fall between logging steps."""
        every = every or trainer.log_every_n_steps
        hist = 10 * every if hist is None else hist
        if every and hist % every:
            raise error(_cadence_mismatch(hist, every))
        if hist and not self._selection.histograms:
            hist = 0  # no histogrammed metric selected
        return every, hist

    def follow(self, cadence: tuple[int, int]) -> None:
        """Log at ``cadence`` (:meth:`cadence_for`), and say so if that is never."""
        if not cadence[0]:
            self._warn("SphereMonitor: `log_every_n_steps=0` on the Trainer turns logging off; nothing is measured.")
        self.cadence = cadence

    def check_loggers(self, loggers: Any) -> None:
        """Say where the metrics go when the Trainer has no logger."""
        if not loggers:
            self._warn(
                "SphereMonitor: the Trainer has no logger; metrics are still measured and kept in "
                "`SphereMonitor.metrics`. Pass `logger=TensorBoardLogger(...)` to see them in charts."
            )

    def start(self, trainer: Any) -> None:
        """At train start: where fit ends (unknown for iterable data with no max_steps, or a max_time)."""
        total = trainer.estimated_stepping_batches
        self._last_step = int(total) if math.isfinite(total) and total > 0 else None
        self._histogram_due = None

    def arm(self, trainer: Any, tracker: SphereTracker) -> None:
        """Have ``tracker`` measure this batch's steps if the batch logs (with histograms if due), else not."""
        every, hist = self.cadence
        step = trainer.fit_loop.epoch_loop._batches_that_stepped + 1  # the step this batch will log at, plus one
        last = step == self._last_step
        if every and (step % every == 0 or last):
            tracker.arm(histograms=bool(hist) and (step % hist == 0 or last))
        else:
            tracker.disarm()

    def write(self, loggers: Any, measurement: Measurement, step: int, run: RunTags = ((), ())) -> None:
        """Log the selected values of ``measurement`` at ``step`` (and keep them in :attr:`metrics`); ``run``: the
        run's own keys logged so far, for the layout (:meth:`LoggerSink.write`)."""
        logged = self._selection(measurement)
        self.metrics = logged.scalars
        self._sink.write(loggers, logged, step, run)
        self._histogram_due = step if self.cadence[1] and not measurement.histograms else None

    def write_layout(self, loggers: Any, step: int, run: RunTags) -> None:
        """The layout with the run's keys as they are at the end of fit (:meth:`LoggerSink.write_layout`)."""
        self._sink.write_layout(loggers, step, run)

    def write_due_histograms(self, loggers: Any, tracker: SphereTracker | None) -> None:
        """Histograms of the last logged step, when fit ended before the cadence took them (early stopping,
        ``max_time``): one more device→host transfer, at the end of fit only."""
        if self._histogram_due is not None and tracker is not None:
            histograms = self._selection(Measurement({}, tracker.last_histograms())).histograms
            self._sink.write_histograms(loggers, histograms, self._histogram_due)
        self._histogram_due = None


def run_tags(trainer: Any) -> RunTags:
    """The keys the run has sent to its loggers so far (``self.log(..., logger=True)``; read from where Lightning
    keeps them, which costs nothing: the public ``Trainer.logged_metrics`` reads the current batch's values, a
    host sync for those shown in the progress bar), and the learning rates a ``LearningRateMonitor`` logs."""
    logged = getattr(getattr(trainer, "_logger_connector", None), "_logged_metrics", None)
    keys = list(logged) if isinstance(logged, dict) else []
    rates = [
        name
        for callback in getattr(trainer, "callbacks", ())
        if any(c.__name__ == "LearningRateMonitor" for c in type(callback).__mro__)
        and isinstance(getattr(callback, "lrs", None), dict)
        for name in callback.lrs
    ]
    return keys, rates
