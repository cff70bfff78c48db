"""Parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): what one rank holds of a tensor.

FSDP2 keeps every parameter, its gradient and its optimizer state as a DTensor sharded on dimension 0 with
``torch.chunk``'s rule: rank r holds rows ``[r·⌈N/W⌉, (r+1)·⌈N/W⌉) ∩ [0, N)`` of the N rows, possibly none. A
group's per-row inner products are computed on the local rows (``to_local()``); its per-group sums are
partial where its rows span ranks, and :class:`GroupSum` adds them up over the ranks of the mesh. Row sums
need no communication, so only the batched per-group sums ``(M, k)`` travel: one collective per call of
:meth:`~lightning_sphere.core.rows.RowIndex.sum_rows`, that is per measured step and optimizer, and per pass of
the spherical correction (docs/theory.md §3–§6 for what the sums are).

Only placements whose rows can be read locally are supported: ``Shard(0)`` on a one-dimensional mesh
(FSDP2), or ``Replicate()`` on every mesh dimension. Anything else (tensor parallelism's ``Shard(1)``, which
splits every row across ranks; ``Shard(0)`` on a tensor-parallel mesh; hybrid 2-D meshes) is refused by
:func:`unsupported_placement`: a row sum there would need a reduction the monitor does not do. What a
training strategy must look like to be supported is :mod:`lightning_sphere.integrations.strategies`'.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeGuard

import torch
import torch.distributed as dist
from torch import Tensor, nn

try:  # absent from a torch built without torch.distributed
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - no DTensor, nothing is sharded
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]


def is_dtensor(t: Any) -> TypeGuard[DTensor]:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The tensor this rank holds: the local shard of a DTensor, else ``t`` itself (no copy)."""
    return t.to_local() if is_dtensor(t) else t


def sharded_rows(param: Tensor) -> tuple[int, int] | None:
    """``(offset, count)``: the rows of dimension 0 of ``param`` that this rank holds, for a DTensor sharded on
    dimension 0 of a mesh of more than one rank; ``None`` for a tensor held whole (plain or replicated).

    Raises:
        ValueError: for a placement whose rows cannot be read locally (:func:`unsupported_placement`).
    """
    if not is_dtensor(param):
        return None
    reason = unsupported_placement(param)
    if reason:
        raise ValueError(reason)
    if all(isinstance(p, Replicate) for p in param.placements):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return int(offset[0]), int(shape[0])


def unsupported_placement(param: Tensor, name: str | None = None) -> str | None:
    """Why the rows of ``param`` (a DTensor) cannot be measured from its local shard, if they cannot."""
    problem = _placement_problem(param)
    if problem is None:
        return None
    label = f"`{name}` " if name else ""
    return f"SphereMonitor cannot measure parameter {label}{problem}. {_WHY}"


def _placement_problem(param: Tensor) -> str | None:
    if not is_dtensor(param):
        return None
    placements = tuple(param.placements)
    if all(isinstance(p, Replicate) for p in placements):
        return None
    mesh = param.device_mesh
    names = mesh.mesh_dim_names or tuple(f"dim {i}" for i in range(mesh.ndim))
    shard0 = len(placements) == 1 and isinstance(placements[0], Shard) and placements[0].dim == 0
    if shard0 and names[0] != "tensor_parallel":  # Lightning's name for its tensor-parallel mesh dimension
        return None
    return f"of shape {tuple(param.shape)}, a DTensor with placements {placements} on the mesh {names}"


#: What the refusals name as supported.
SUPPORTED_STRATEGIES = (
    "DDP (`strategy='ddp'`), ModelParallelStrategy with FSDP2 only (`fully_shard` on the data-parallel mesh in "
    "`configure_model`, and no tensor-parallel plan on any weight), or a single device"
)


_WHY = (
    "Only Shard(0) on a one-dimensional data-parallel mesh (FSDP2's fully_shard) or Replicate keeps each "
    "filter's rows whole and measured once; tensor parallelism (RowwiseParallel's Shard(1) splits every row, "
    "ColwiseParallel's Shard(0) on the tensor-parallel mesh, 2-D meshes) is not supported. Supported: "
    f"{SUPPORTED_STRATEGIES}; or remove SphereMonitor from the callbacks."
)


def unsharded_aliases(model: nn.Module) -> dict[Tensor, Tensor]:
    """FSDP2's sharded parameter → the unsharded copy its module holds during forward, which the autograd
    graph records; empty for models FSDP2 does not shard (or a torch whose FSDP2 keeps them elsewhere).

    Reads FSDP2's internal state (``FSDPParam.sharded_param`` and ``_unsharded_param``): torch offers no public
    way to tell which graph leaf a sharded parameter was gathered into.
    """
    aliases: dict[Tensor, Tensor] = {}
    for module in model.modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        if get_state is None:
            continue
        try:
            params = get_state()._fsdp_param_group.fsdp_params
        except AttributeError:  # no parameter of its own, or another torch
            continue
        for fsdp_param in params:
            unsharded = getattr(fsdp_param, "_unsharded_param", None)
            if unsharded is not None:
                aliases[fsdp_param.sharded_param] = unsharded
    return aliases


class GroupSum:
    """Adds per-group partial sums over the ranks that hold the rows: on every rank, the same bits.

    The partial sums are gathered (``all_gather``) and added in rank order on every rank, so that every rank
    ends with bitwise the same totals (an all-reduce need not); groups a rank holds no row of contribute
    exact zeros. Called once per batched ``(M, k)`` sum: the only collective the monitor adds.

    Args:
        group: the process group of the mesh the parameters are sharded over.
    """

    def __init__(self, group: Any) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        #: collectives issued so far (for tests and benchmarks)
        self.calls = 0

    def __call__(self, partial: Tensor) -> Tensor:
        self.calls += 1
        parts = [torch.empty_like(partial) for _ in range(self.size)]
        dist.all_gather(parts, partial.contiguous(), group=self.group)
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total


def group_sum_for(params: Iterable[Tensor]) -> GroupSum | None:
    """The :class:`GroupSum` of ``params``' mesh if any is sharded over more than one rank, else ``None``.

    Raises:
        ValueError: for parameters sharded over different meshes, or placed in a way :func:`sharded_rows`
            refuses.
    """
    meshes: list[Any] = []
    for p in params:
        if is_dtensor(p) and sharded_rows(p) is not None and all(p.device_mesh is not m for m in meshes):
            meshes.append(p.device_mesh)
    if not meshes:
        return None
    if len({tuple(m.mesh.flatten().tolist()) for m in meshes}) > 1:
        raise ValueError("the tracked parameters are sharded over different device meshes; shard them over one")
    return GroupSum(meshes[0].get_group())
