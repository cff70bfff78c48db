"""Which weights live on a sphere (a stage of the same rank as ``measurement`` and ``correction``, which it does not
import): the real step's forward pass recorded (:mod:`~lightning_sphere.detection.recorder`), each layer's scale
followed through its autograd graph (:mod:`~lightning_sphere.detection.walk`, with the rules of
:mod:`~lightning_sphere.detection.operations`) into candidate groups (:mod:`~lightning_sphere.detection.layers`,
:mod:`~lightning_sphere.detection.parametrized`, :mod:`~lightning_sphere.detection.candidates`), verified by the
gradient test (:mod:`~lightning_sphere.detection.gradient_test`), as training goes (:class:`GroupFinder`) or on an
example input (:func:`find_invariant_groups`)."""

from lightning_sphere.detection.api import FoundGroups, find_invariant_groups
from lightning_sphere.detection.finder import GroupFinder

__all__ = ["FoundGroups", "GroupFinder", "find_invariant_groups"]
