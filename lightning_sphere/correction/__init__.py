"""Stage 3, the spherical corrections: one algorithm per module over a shared base
(:mod:`~lightning_sphere.correction.base`): :class:`AdamRewrite` (AdamS, AdamSRT), :class:`MomentumRewrite`
(SGDMRT), :class:`AdamGRewrite` (SGD as AdamG). Each rewrite owns a guard that decides where it steps aside
(:mod:`~lightning_sphere.correction.safeguards`); the AdamG rewrite keeps the norms' running statistics in its
scale (:mod:`~lightning_sphere.correction.statistics`). Which one applies to which optimizer is the optimizer
registry's call (:mod:`lightning_sphere.optimizers`); the algorithms do not know the registry."""

from lightning_sphere.correction.adam import AdamRewrite
from lightning_sphere.correction.adamg import AdamGRewrite
from lightning_sphere.correction.base import Rewrite, StepView
from lightning_sphere.correction.momentum import MomentumRewrite
from lightning_sphere.correction.safeguards import Safeguards

__all__ = ["AdamGRewrite", "AdamRewrite", "MomentumRewrite", "Rewrite", "Safeguards", "StepView"]
