"""What the package uses of torch releases newer than its floor (``torch>=2.4``), in one place.

Every API below came after the oldest torch the package installs with. The package reaches each through
:func:`api` (``None`` when the running torch predates it), so that a user on an older release gets the features
that need it turned off, or refused with the release to upgrade to, never an ``AttributeError`` in the middle of
training. ``tests/test_versions.py`` checks the list against the running torch and the package's source: a new
use of a gated API outside this module fails it. ``docs/development.md`` says how the floor and the newest release
are tried.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Gated:
    """An API newer than the torch floor: where it lives, the release that introduced it, what needs it and what
    happens without it."""

    #: dotted path, module then attributes (``torch.optim.Muon``)
    path: str
    #: the first torch release that has it
    since: str
    #: what in this package uses it
    used_for: str
    #: what happens on an older torch
    without: str
    #: where an older torch had it, if anywhere (a private module)
    before: str | None = None


#: The APIs newer than the torch floor, by path. Sources: torch's release notes (2.5: Adafactor and the public
#: ``torch.distributed.tensor``; 2.6: ``torch.compiler.set_stance``; 2.9: Muon).
GATED: dict[str, Gated] = {
    g.path: g
    for g in (
        Gated(
            "torch.compiler.set_stance",
            "2.6",
            "running a compiled model's first training step eagerly, so that detection sees its layer calls",
            "a compiled model is refused at its first step with the release to upgrade to; uncompiled ones are "
            "unaffected",
        ),
        Gated(
            "torch.optim.Adafactor",
            "2.5",
            "torch's Adafactor in the optimizer registry (§8.4)",
            "not registered (there is no such optimizer to use)",
        ),
        Gated(
            "torch.optim.Muon",
            "2.9",
            "torch's Muon in the optimizer registry (§8.2)",
            "not registered; another Muon can be with register_muon",
        ),
        Gated(
            "torch.distributed.tensor.DTensor",
            "2.5",
            "reading FSDP2's sharded parameters (DTensor, Shard, Replicate)",
            "read from torch.distributed._tensor, where torch 2.4 has them",
            before="torch.distributed._tensor.DTensor",
        ),
        Gated(
            "torch.distributed.tensor._utils.compute_local_shape_and_global_offset",
            "2.5",
            "the rows of a sharded parameter this rank holds (FSDP2)",
            "read from torch.distributed._tensor._utils, where torch 2.4 has it",
            before="torch.distributed._tensor._utils.compute_local_shape_and_global_offset",
        ),
    )
}


def resolve(path: str) -> Any | None:
    """The object at a dotted ``path`` (modules imported as needed), ``None`` if the running torch lacks it."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            found = getattr(found, name, None)
            if found is None:
                return None
        return found
    return None


def api(path: str) -> Any | None:
    """A gated API (a key of :data:`GATED`): the running torch's, or where an older one kept it, else ``None``.

    Raises:
        KeyError: for a path not listed in :data:`GATED` (list it, with the release that introduced it).
    """
    gated = GATED[path]
    found = resolve(path)
    if found is None and gated.before is not None:
        found = resolve(gated.before)
    return found


def dtensor_types() -> tuple[Any, Any, Any]:
    """``(DTensor, Replicate, Shard)`` of the running torch (from ``torch.distributed._tensor`` on torch 2.4),
    ``None`` each on a torch built without distributed support."""
    dtensor = api("torch.distributed.tensor.DTensor")
    if dtensor is None:
        return None, None, None
    home = importlib.import_module(dtensor.__module__)
    return dtensor, getattr(home, "Replicate", None), getattr(home, "Shard", None)


def compiled(model: torch.nn.Module) -> bool:
    """Whether any module of ``model`` runs compiled code: a ``torch.compile(module)`` wrapper, a module compiled
    in place (``module.compile()``), or a LightningModule given to ``Trainer.fit`` compiled (its ``_compiler_ctx``)."""
    return any(
        type(m).__name__ == "OptimizedModule"
        or getattr(m, "_compiled_call_impl", None) is not None
        or getattr(m, "_compiler_ctx", None) is not None
        for m in model.modules()
    )


def compile_refusal(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot be monitored on the running torch (a compiled model before torch 2.6, which cannot run
    its first step eagerly on demand), or ``None``."""
    if api("torch.compiler.set_stance") is not None or not compiled(model):
        return None
    return (
        f"a torch.compile'd model needs torch >= {GATED['torch.compiler.set_stance'].since} "
        "(torch.compiler.set_stance runs its first training step eagerly, so that detection sees its layers); this "
        f"is torch {torch.__version__}. Upgrade torch, or train the model uncompiled"
    )


def force_eager() -> contextlib.AbstractContextManager[Any]:
    """Compiled code runs eagerly inside: ``torch.compiler.set_stance("force_eager")`` (torch >= 2.6). On an older
    torch, nothing (a compiled model is refused before: :func:`compile_refusal`)."""
    set_stance = api("torch.compiler.set_stance")
    if set_stance is None:
        return contextlib.nullcontext()
    context: contextlib.AbstractContextManager[Any] = set_stance("force_eager")
    return context
