"""The optimizer registry, above the corrections it chooses from: for each optimizer class, how it reads in the scheme
of docs/theory.md §2 (a, b, decoupled decay), its §7 equilibrium, and which correction rewrites it
(:mod:`~lightning_sphere.optimizers.registry`); one module per family registers its classes
(:mod:`~lightning_sphere.optimizers.sgd`, :mod:`~lightning_sphere.optimizers.adam`);
:mod:`~lightning_sphere.optimizers.modes` turns a ``spherical_correction`` argument into the algorithm for each param
group."""

from lightning_sphere.optimizers import adam, sgd  # noqa: F401 - their import registers torch's SGD, Adam and AdamW
from lightning_sphere.optimizers.adam import adam_moments
from lightning_sphere.optimizers.equilibrium import angular_update_equilibrium
from lightning_sphere.optimizers.modes import cannot_invert, correction_mode, rewrite_for, unsupported
from lightning_sphere.optimizers.registry import (
    MEASURED,
    MODES,
    OPTIMIZERS,
    SUPPORTED,
    Moments,
    OptimizerRule,
    class_path,
    register_optimizer,
    rule_of,
    unwrap_optimizer,
)

__all__ = [
    "MEASURED",
    "MODES",
    "OPTIMIZERS",
    "SUPPORTED",
    "Moments",
    "OptimizerRule",
    "adam_moments",
    "angular_update_equilibrium",
    "cannot_invert",
    "class_path",
    "correction_mode",
    "register_optimizer",
    "rewrite_for",
    "rule_of",
    "unsupported",
    "unwrap_optimizer",
]
