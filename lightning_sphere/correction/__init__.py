"""The spherical corrections (a stage of the same rank as ``detection`` and ``measurement``): one algorithm per module
over a shared base (:mod:`~lightning_sphere.correction.base`): :class:`AdamRewrite` (AdamS, AdamSRT),
:class:`MomentumRewrite` (SGDMRT), :class:`AdamGRewrite` (SGD as AdamG). Which one applies to which optimizer is the
optimizer registry's call (:mod:`lightning_sphere.optimizers`); the algorithms do not know the registry."""

from lightning_sphere.correction.adam import AdamRewrite
from lightning_sphere.correction.adamg import AdamGRewrite
from lightning_sphere.correction.base import Rewrite, StepView
from lightning_sphere.correction.momentum import MomentumRewrite
from lightning_sphere.correction.safeguards import Safeguards

__all__ = ["AdamGRewrite", "AdamRewrite", "MomentumRewrite", "Rewrite", "Safeguards", "StepView"]
