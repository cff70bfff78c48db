"""``SphereMonitor``'s arguments, checked at construction: the type and range each takes, named in the error."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any


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
        "metrics": ("a list of metric names or None", lambda v: v is None or _names(v)),
        "per_layer": ("a bool or a list of metric names", lambda v: isinstance(v, bool) or _names(v)),
    }
    for name, value in arguments.items():
        what, valid = expected[name]
        if not valid(value):
            raise error(f"SphereMonitor(`{name}`) must be {what}, got {value!r} ({type(value).__name__})")


def _cadence_mismatch(hist: int, every: int) -> str:
    return (
        f"SphereMonitor(`histogram_every_n_steps={hist}`) must be a multiple of the logging cadence ({every} "
        "steps), since histograms are taken on logging steps; or 0 to turn them off."
    )


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
