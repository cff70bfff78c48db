"""lightning_sphere: the spherical dynamics of normalized networks, measured and controlled.

``SphereMonitor`` is the Lightning callback (for ``pytorch_lightning``; ``lightning_sphere.lightning``
has the one for ``lightning.pytorch``). Everything else is plain PyTorch, and importing the package
does not import Lightning. The public API is :data:`__all__`; docs/reference/api.md documents it.
"""

from typing import Any

from lightning_sphere.core.groups import InvariantGroups, ParamSlice
from lightning_sphere.core.tolerance import COSINE_TOLERANCE, NUMERIC_TOLERANCE
from lightning_sphere.correction.steering_options import Hyperball, Rotational
from lightning_sphere.detection.api import FoundGroups, find_invariant_groups
from lightning_sphere.measurement.metrics import METRICS, Metric
from lightning_sphere.optimizers.registry import Moments, OptimizerRule, register_optimizer
from lightning_sphere.reporting.summary import summarize
from lightning_sphere.tracking.tracker import Measurement, SphereTracker

__version__ = "0.2.0"

__all__ = [
    "COSINE_TOLERANCE",
    "METRICS",
    "NUMERIC_TOLERANCE",
    "FoundGroups",
    "Hyperball",
    "InvariantGroups",
    "Measurement",
    "Metric",
    "Moments",
    "OptimizerRule",
    "ParamSlice",
    "Rotational",
    "SphereMonitor",
    "SphereTracker",
    "find_invariant_groups",
    "register_optimizer",
    "summarize",
]


def __getattr__(name: str) -> Any:
    if name == "SphereMonitor":  # imported on first use, so that the plain-PyTorch core needs no Lightning
        from lightning_sphere.pytorch_lightning import SphereMonitor

        return SphereMonitor
    raise AttributeError(f"module 'lightning_sphere' has no attribute {name!r}")
