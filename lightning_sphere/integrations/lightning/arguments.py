"""``SphereMonitor``'s arguments, checked at construction (the type and range each takes, named in the error) and
against the optimizers at fit start; the metrics selection and the correction mode they give."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_sphere.optimizers.modes import Mode, cannot_invert, correction_mode, unsupported
from lightning_sphere.optimizers.registry import MODES
from lightning_sphere.reporting.sinks import Selection


def _check_arguments(error: type[Exception], callback: str = "SphereMonitor", **arguments: Any) -> None:
    """Raise ``error`` naming the argument (of ``callback``, the class the user wrote), the expected type and the
    value, for a value of the wrong type or range, and for a histogram cadence that is not a multiple of the logging
    cadence. Bools are not taken for numbers."""
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
        "metrics": ("a list of metric names or None", lambda v: v is None or _names(v)),
        "per_layer": ("a bool or a list of metric names", lambda v: isinstance(v, bool) or _names(v)),
    }
    for name, value in arguments.items():
        what, valid = expected[name]
        if not valid(value):
            raise error(f"{callback}(`{name}`) must be {what}, got {value!r} ({type(value).__name__})")
    every, hist = arguments.get("log_every_n_steps"), arguments.get("histogram_every_n_steps")
    if every and hist and hist % every:
        raise error(_cadence_mismatch(hist, every))


def _selection(
    error: type[Exception],
    metrics: Sequence[str] | None,
    per_layer: bool | Sequence[str],
    callback: str = "SphereMonitor",
) -> Selection:
    """The keys to log (:class:`~lightning_sphere.reporting.sinks.Selection`); ``error`` for an unknown metric."""
    try:
        return Selection.of(metrics, per_layer)
    except ValueError as err:
        raise error(f"{callback}: {err}") from None


def _correction(error: type[Exception], spherical_correction: Any, callback: str = "SphereMonitor") -> Mode | None:
    """The correction mode ``spherical_correction`` names (``None``: measurement only); ``error`` for another
    value."""
    try:
        return correction_mode(spherical_correction)
    except ValueError:
        raise error(
            f"{callback}(`spherical_correction`) must be True, False, one of {MODES}, a Rotational(...) or a "
            f"Hyperball(...), got "
            f"{spherical_correction!r} ({type(spherical_correction).__name__})"
        ) from None


def _cadence_mismatch(hist: int, every: int) -> str:
    return (
        f"SphereMonitor(`histogram_every_n_steps={hist}`) must be a multiple of the logging cadence ({every} "
        "steps), since histograms are taken on logging steps; or 0 to turn them off."
    )


def _check_optimizers(
    error: type[Exception], optimizers: Sequence[torch.optim.Optimizer], correction: Mode | None
) -> None:
    """At fit start: ``error`` for an optimizer or option the spherical ``correction`` cannot honour, or a param
    group whose lr·weight_decay ≥ 1 it could not undo."""
    if correction is None:
        return
    for optimizer in optimizers:
        reason = unsupported(optimizer, correction) or cannot_invert(optimizer, correction)
        if reason:
            raise error(f"SphereMonitor(spherical_correction=...): {reason}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _names(value: Any) -> bool:
    return isinstance(value, Sequence) and all(isinstance(v, str) for v in value)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _valid_groups_spec(value: Any) -> bool:
    if isinstance(value, str):
        return value in ("auto", "numeric")
    if not isinstance(value, Mapping):
        return False
    return all(isinstance(k, str) and (v in ("channel", "layer") or (_is_int(v) and v > 0)) for k, v in value.items())
