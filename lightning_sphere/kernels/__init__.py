"""The fused per-row kernels of the two hot paths, above ``core``: the measurement's inner products
(:mod:`~lightning_sphere.kernels.products`) and the correction's reads and writes
(:mod:`~lightning_sphere.kernels.rewrites`), run eagerly or compiled (:mod:`~lightning_sphere.kernels.compiled`)."""

import torch  # noqa: F401 - the namespace the compile policy uses (tests patch ``torch.compile`` through it)

from lightning_sphere.kernels.compiled import COMPILE_FROM, Kernels, host_float, scalar, should_compile
from lightning_sphere.kernels.products import StepProducts, adam_denominator, adam_products, sgd_products
from lightning_sphere.kernels.rewrites import (
    AdamGSums,
    RewriteSums,
    adam_apply,
    adam_sums,
    adamg_direction,
    adamg_sums,
    momentum_sums,
    momentum_transport,
    scale_rows,
)

__all__ = [
    "COMPILE_FROM",
    "AdamGSums",
    "Kernels",
    "RewriteSums",
    "StepProducts",
    "adam_apply",
    "adam_denominator",
    "adam_products",
    "adam_sums",
    "adamg_direction",
    "adamg_sums",
    "host_float",
    "momentum_sums",
    "momentum_transport",
    "scalar",
    "scale_rows",
    "sgd_products",
    "should_compile",
]
