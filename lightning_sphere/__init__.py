"""lightning_sphere: the spherical dynamics of normalized networks, measured and controlled."""

from lightning_sphere.detect import FoundGroups, GroupFinder, find_invariant_groups
from lightning_sphere.groups import COSINE_TOLERANCE, InvariantGroups, ParamSlice
from lightning_sphere.pytorch_lightning import SphereMonitor
from lightning_sphere.summary import summarize
from lightning_sphere.tracker import Measurement, SphereTracker

__version__ = "0.1.0"

__all__ = [
    "COSINE_TOLERANCE",
    "FoundGroups",
    "GroupFinder",
    "InvariantGroups",
    "Measurement",
    "ParamSlice",
    "SphereMonitor",
    "SphereTracker",
    "find_invariant_groups",
    "summarize",
]
