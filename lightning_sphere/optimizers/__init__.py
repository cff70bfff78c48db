"""The optimizer registry, above the corrections it chooses from: for each optimizer class, how it reads in the scheme
of docs/theory.md §2 (a, b, decoupled decay), its §7 equilibrium, and which correction rewrites it
(:mod:`~lightning_sphere.optimizers.registry`); one module per family registers its classes
(:mod:`~lightning_sphere.optimizers.sgd`, :mod:`~lightning_sphere.optimizers.adam`, and those of §8:
:mod:`~lightning_sphere.optimizers.muon`, :mod:`~lightning_sphere.optimizers.lion`,
:mod:`~lightning_sphere.optimizers.adafactor`, :mod:`~lightning_sphere.optimizers.schedulefree`,
:mod:`~lightning_sphere.optimizers.prodigy`);
:mod:`~lightning_sphere.optimizers.modes` turns a ``spherical_correction`` argument into the algorithm for each param
group."""

from lightning_sphere.optimizers import (  # noqa: F401 - importing them registers their optimizers
    adafactor,
    adam,
    lion,
    muon,
    prodigy,
    schedulefree,
    sgd,
)
from lightning_sphere.optimizers.adam import adam_moments
from lightning_sphere.optimizers.equilibrium import angular_update_equilibrium, filtered_update_equilibrium
from lightning_sphere.optimizers.lion import lion_rule, sign_filter_ratio
from lightning_sphere.optimizers.modes import cannot_invert, correction_mode, rewrite_for, unsupported
from lightning_sphere.optimizers.muon import muon_filter_ratio, muon_rule, register_muon
from lightning_sphere.optimizers.registry import (
    BY_PATH,
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
    "BY_PATH",
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
    "filtered_update_equilibrium",
    "lion_rule",
    "muon_filter_ratio",
    "muon_rule",
    "register_muon",
    "register_optimizer",
    "rewrite_for",
    "rule_of",
    "sign_filter_ratio",
    "unsupported",
    "unwrap_optimizer",
]
