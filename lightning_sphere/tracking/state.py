"""What the model and its normalizations look like to a correction: running statistics, a bias the norm cancels,
the safeguards built from them and the tracker's arguments, and state dicts that hold the plain optimizer's
weights under the AdamG rewrite.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sphere.core.groups import InvariantGroups
from lightning_sphere.core.names import get_submodule
from lightning_sphere.core.tolerance import tolerance_for
from lightning_sphere.correction.base import Rewrite
from lightning_sphere.correction.safeguards import Safeguards


def _safeguards(
    model: nn.Module | None,
    tolerance: float | None,
    compute_dtype: torch.dtype | None,
    warn: Callable[[str], None] | None,
    gradient_clipping: str | None,
) -> Safeguards:
    """The corrections' :class:`Safeguards` from :class:`~lightning_sphere.tracking.SphereTracker`'s arguments
    of the same names (see there).

    Raises:
        ValueError: ``gradient_clipping`` is not ``None``, ``"value"`` or ``"norm"``.
    """
    if gradient_clipping not in (None, "value", "norm"):
        raise ValueError(f'gradient_clipping must be None, "value" or "norm", got {gradient_clipping!r}')
    return Safeguards(
        tolerance=lambda entry: tolerance_for(entry, tolerance, compute_dtype),
        norms=lambda entry: _running_statistics(model, entry),
        shift=lambda entry: _outside_bias(model, entry),
        warn=warn or (lambda message: warnings.warn(message, stacklevel=2)),
        radial_cause=(
            "its gradients are clipped by value, entry by entry, which gives a tangent gradient a radial part"
            if gradient_clipping == "value"
            else None
        ),
    )


def _real_state_dicts(model: nn.Module | None, rewrites: Sequence[Rewrite]) -> list[Any]:
    """State-dict hooks on the modules that own what a rewrite stores differently from the plain optimizer (the
    AdamG rewrite's unit-norm weights and the running statistics in their scale), so that every ``state_dict()``
    of the model or of a module holding them — Lightning's checkpoints, ``torch.save`` — holds the plain
    optimizer's values: it loads and trains without lightning_sphere as the plain optimizer's model does. The
    model's own tensors are untouched; ``keep_vars=True`` gets them as they are. Returns the hooks' handles."""
    owner = {t: rewrite for rewrite in rewrites for t in rewrite.real_tensors()}
    if model is None or not owner:
        return []
    handles = []
    for module in model.modules():
        tensors = [*module._parameters.items(), *module._buffers.items()]
        own = [(n, t) for n, t in tensors if t is not None and t in owner]
        if not own:
            continue

        def hook(module: nn.Module, state: dict[str, Any], prefix: str, metadata: Any, own: Any = own) -> None:
            with torch.no_grad():
                for name, tensor in own:
                    value = state.get(prefix + name)
                    if isinstance(value, Tensor) and value is not tensor:
                        state[prefix + name] = owner[tensor].real_value(tensor, value)

        handles.append(module.register_state_dict_post_hook(hook))
    return handles


def _running_statistics(model: nn.Module | None, entry: InvariantGroups) -> tuple[nn.Module, ...] | None:
    """The normalization of ``entry`` if, in eval mode, it normalizes with running statistics (BatchNorm,
    InstanceNorm with ``track_running_stats``): the module is then not invariant any more. ``None`` when it
    cannot be known: no ``model``, or ``entry`` names no normalization (``groups=``) while ``model`` has such
    normalizations."""
    if model is None:
        return None if entry.norm_name else ()
    if not entry.norm_name:
        return None if entry.norm_type in _UNKNOWN_NORM and any(map(_keeps_statistics, model.modules())) else ()
    try:
        norm = get_submodule(model, entry.norm_name)
    except AttributeError:
        return ()
    return (norm,) if _keeps_statistics(norm) else ()


def _outside_bias(model: nn.Module | None, entry: InvariantGroups) -> Tensor | None:
    """The bias of ``entry``'s layer when it is not in the groups (the normalization cancels it)."""
    if model is None:
        return None
    try:
        bias = get_submodule(model, entry.module_name)._parameters.get("bias")  # a computed bias is not evaluated
    except AttributeError:
        return None
    return bias if isinstance(bias, Tensor) and all(bias is not p for p in entry.params) else None


#: The ``norm_type`` of groups whose normalization detection did not see (numeric and named groups).
_UNKNOWN_NORM = ("gradient test", "explicit")


def _keeps_statistics(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats
