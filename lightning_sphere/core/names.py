"""Module and parameter names as the user wrote them, through wrapper modules.

``torch.compile(module)`` returns an ``OptimizedModule`` that holds the module as its child ``_orig_mod``, and
Lightning Fabric's ``setup`` a ``_FabricModule`` that holds it as ``_forward_module`` (possibly inside a strategy
wrapper such as DDP) and ``_original_module``. ``named_modules()`` then says ``net._orig_mod.0`` where the user
wrote ``net.0``, and a compiled and an uncompiled run of one model would log under different keys. Here every
wrapper, at any depth, stands for the module it wraps: it takes the wrapper's name and the wrapper itself is not
listed. Everything in the package that names a module or a parameter goes through these functions.

The wrapper classes are recognized only if their modules were imported (a model cannot hold an instance of a
class whose module was never imported): naming never imports ``torch._dynamo`` or Lightning.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from torch import nn


def _wrapped(module: nn.Module) -> nn.Module | None:
    """The module ``module`` wraps, if it is a wrapper: a compiled module's original, a Fabric module's original
    (not its ``_forward_module``, which may be a strategy's wrapper of it)."""
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    if dynamo is not None and isinstance(module, dynamo.OptimizedModule):
        return module._modules["_orig_mod"]
    fabric = sys.modules.get("lightning.fabric.wrappers")
    if fabric is not None and isinstance(module, fabric._FabricModule):
        return module._modules["_original_module"]
    return None


def unwrap(module: nn.Module) -> nn.Module:
    """The module the user wrote under any stack of wrappers (``module`` itself when it is none)."""
    while (inner := _wrapped(module)) is not None:
        module = inner
    return module


def named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` with wrappers transparent: each module once, in the same (pre-)order, under the
    name the user wrote (``net.0``, not ``net._orig_mod.0`` or ``_forward_module.net.0``)."""
    seen: set[nn.Module] = set()

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        module = unwrap(module)
        if module in seen:
            return
        seen.add(module)
        yield prefix, module
        for name, child in module._modules.items():
            if child is not None:
                yield from walk(child, f"{prefix}.{name}" if prefix else name)

    yield from walk(model, "")


def named_parameters(model: nn.Module, remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
    """``model.named_parameters()`` under the names of :func:`named_modules`, in the same order. With
    ``remove_duplicate=False``, a parameter shared by several modules (tied weights) comes once per owner."""
    seen: set[nn.Parameter] = set()
    for prefix, module in named_modules(model):
        for name, p in module._parameters.items():
            if p is None or (remove_duplicate and p in seen):
                continue
            seen.add(p)
            yield (f"{prefix}.{name}" if prefix else name), p


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    """The module :func:`named_modules` calls ``name``.

    Raises:
        AttributeError: when ``model`` has no such module (as ``nn.Module.get_submodule``).
    """
    module = unwrap(model)
    for atom in name.split(".") if name else ():
        child = module._modules.get(atom)
        if child is None:
            raise AttributeError(f"{type(module).__name__} has no submodule `{atom}` (looking up `{name}`)")
        module = unwrap(child)
    return module


def model_order(model: nn.Module) -> dict[str, int]:
    """Module name → its position in :func:`named_modules`: the order groups and summaries are listed in."""
    return {name: i for i, (name, _) in enumerate(named_modules(model))}


def position(order: dict[str, int], name: str) -> tuple[int, str]:
    """Where ``name`` sorts in model order: a module's own position; a name below a module (a parameter
    ``net.0.weight``, a tensor ``net.0.weight_v``) sorts right after that module; an unknown name last."""
    probe = name
    while probe not in order and "." in probe:
        probe = probe.rsplit(".", 1)[0]
    return (order.get(probe, len(order)), name)


def class_name(module: nn.Module) -> str:
    """The name of the class the user wrote for ``module``: FSDP2's ``fully_shard`` swaps it for a subclass
    named ``FSDP<name>``, which is not what the user knows it by."""
    cls = type(module)
    original = next((base for base in cls.__bases__ if f"FSDP{base.__name__}" == cls.__name__), None)
    return (original or cls).__name__
