"""Training strategies: which are supported, and what a sharded model needs before its groups are tracked.

DDP keeps every parameter whole on every rank; FSDP2 (Lightning's ``ModelParallelStrategy`` with
``fully_shard``) shards them on dimension 0 (:mod:`lightning_sphere.core.sharding`). FSDP1 and DeepSpeed
flatten a filter into 1-D buffers, and tensor parallelism splits rows across ranks: refused, with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from lightning_sphere.core.compat import refusal, supported
from lightning_sphere.core.names import named_parameters
from lightning_sphere.core.sharding import _WHY, SUPPORTED_STRATEGIES, _placement_problem, is_dtensor, sharded_rows

try:  # absent from a torch built without torch.distributed
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - no DTensor, nothing is sharded
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]


def flat_buffer_refusal(strategy: Any) -> str:
    """Why SphereMonitor refuses ``strategy``, one that flattens parameters into 1-D buffers (FSDP1, DeepSpeed)."""
    return (
        f"SphereMonitor does not support {type(strategy).__name__}: it flattens parameters into "
        f"1-D buffers, so that a filter's entries are not one row on one device. Supported: "
        f"{SUPPORTED_STRATEGIES}; or remove SphereMonitor from the callbacks."
    )


def check_model(model: nn.Module) -> str | None:
    """Why ``model`` cannot be monitored, naming every parameter of two or more dimensions (those the monitor
    may track) whose placement :func:`unsupported_placement` refuses; ``None`` if none."""
    if not supported("fsdp2") and any(is_dtensor(p) for _, p in named_parameters(model)):
        return f"{refusal('fsdp2')}. Upgrade torch, or train on one device or with DDP"
    problems = [
        f"`{name}` {problem}"
        for name, p in named_parameters(model)
        if p.dim() >= 2 and (problem := _placement_problem(p))
    ]
    if not problems:
        return None
    return f"SphereMonitor cannot measure parameter{'s' if len(problems) > 1 else ''} {'; '.join(problems)}. {_WHY}"


def rebind(entries: Sequence[Any], model: nn.Module) -> list[Any]:
    """``entries`` (``InvariantGroups``) with every slice's parameter looked up by name in ``model`` now.

    FSDP2 swaps a module's parameters for unsharded copies during forward and back afterwards: detection
    reads the graph while some layers hold their unsharded copies, the optimizer steps the sharded ones.
    """
    from dataclasses import replace

    params = dict(named_parameters(model))
    out = []
    for entry in entries:
        slices = tuple(
            s if params.get(s.name, s.param) is s.param else replace(s, param=params[s.name]) for s in entry.slices
        )
        same = all(a is b for a, b in zip(slices, entry.slices, strict=True))
        out.append(entry if same else replace(entry, slices=slices))
    return out


def cut_by_shards(entries: Sequence[Any]) -> list[tuple[Any, str]]:
    """The ``entries`` (``InvariantGroups``) whose output channels a shard of dim 0 cuts across (a grouped
    ConvTranspose weight, whose channel is (group, dim 1)), with why they cannot be measured."""
    out = []
    for entry in entries:
        for s in entry.slices:
            if s.split > 1 and sharded_rows(s.param) is not None:
                why = (
                    f"{s.name} is a grouped ConvTranspose weight, whose output channels FSDP2's shards of dim 0 cut "
                    "across; leave this layer out of fully_shard to track it"
                )
                out.append((entry, why))
                break
    return out
