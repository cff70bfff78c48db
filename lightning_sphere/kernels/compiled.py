"""The per-row kernels run eagerly or ``torch.compile``d, and how hyper-parameters reach them without a sync.

:class:`Kernels` runs every kernel of :mod:`lightning_sphere.kernels.products` and
:mod:`lightning_sphere.kernels.rewrites` eagerly or compiled with ``torch.compile``, which fuses every product
and reduction of a row into one pass over memory with no full-size temporaries: a tenfold speed-up on a
ResNet-18 on a CPU. Compiling costs seconds once, so it pays for large models and on GPUs; if it fails
(no compiler at hand), the eager functions take over with one warning. Hyper-parameters come as 0-dim
float64 tensors (:func:`scalar`) and per-row coefficients as ``(C, 1)`` columns, so that one compiled graph
serves every step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from lightning_sphere.kernels.products import adam_products, sgd_products
from lightning_sphere.kernels.rewrites import (
    adam_apply,
    adam_sums,
    adamg_direction,
    adamg_sums,
    hyperball_write,
    momentum_sums,
    momentum_transport,
    rotational_write,
    scale_rows,
    update_sums,
)

#: Total tracked entries from which compiling the kernels pays for its one-time cost.
COMPILE_FROM = 2**20


_F = TypeVar("_F", bound=Callable[..., Any])


def scalar(value: Any) -> Tensor:
    """A hyper-parameter (float, or tensor where it already lives) as a 0-dim float64 tensor: one compiled
    graph serves every value, and using it needs no host sync."""
    return torch.as_tensor(value, dtype=torch.float64)


def host_float(value: Any) -> float | None:
    """A hyper-parameter as a Python float without a device sync; ``None`` for a tensor held on a device."""
    if isinstance(value, Tensor):
        return float(value) if value.device.type == "cpu" else None
    return None if value is None else float(value)


class Kernels:
    """The kernels, eager or compiled: each attribute is the module-level function of the same name.

    Args:
        compiled: compile with ``torch.compile(dynamic=True)``; on failure, warn once and run eagerly.
    """

    def __init__(self, compiled: bool) -> None:
        self.compiled = compiled
        self.sgd_products = self._wrap(sgd_products)
        self.adam_products = self._wrap(adam_products)
        self.adam_sums = self._wrap(adam_sums)
        self.adam_apply = self._wrap(adam_apply)
        self.momentum_sums = self._wrap(momentum_sums)
        self.momentum_transport = self._wrap(momentum_transport)
        self.adamg_sums = self._wrap(adamg_sums)
        self.adamg_direction = self._wrap(adamg_direction)
        self.scale_rows = self._wrap(scale_rows)
        self.update_sums = self._wrap(update_sums)
        self.rotational_write = self._wrap(rotational_write)
        self.hyperball_write = self._wrap(hyperball_write)

    def _wrap(self, eager: _F) -> _F:
        if not self.compiled:
            return eager
        compiled = torch.compile(eager, dynamic=True)

        def run(*args: Any) -> Any:
            if not self.compiled:
                return eager(*args)
            try:
                return compiled(*args)
            except Exception as err:
                warnings.warn(
                    f"lightning_sphere: torch.compile failed ({err!r:.200}); running the kernels eagerly", stacklevel=2
                )
                self.compiled = False
                return eager(*args)

        return run  # type: ignore[return-value]


def should_compile(numel: int, device: torch.device) -> bool:
    """Whether compiling pays: on GPUs, and for models of at least :data:`COMPILE_FROM` tracked entries."""
    return device.type == "cuda" or numel >= COMPILE_FROM
