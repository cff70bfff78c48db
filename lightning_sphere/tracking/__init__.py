"""The framework-free engine, above measurement, correction and the registry: :class:`SphereTracker` hooks into
optimizers, measures armed steps (:mod:`~lightning_sphere.tracking.probe`) and runs the corrections, with the model's
state dicts kept plain (:mod:`~lightning_sphere.tracking.state`)."""

from lightning_sphere.tracking.tracker import Measurement, SphereTracker

__all__ = ["Measurement", "SphereTracker"]
