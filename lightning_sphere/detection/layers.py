"""Candidate invariant groups, read off the autograd graph of one real forward pass.

No symbolic tracing: :class:`~lightning_sphere.detection.recorder.DataflowRecorder` notes, for every module
call, the autograd nodes of its input and output; :func:`find_candidates` then follows each layer's output
forward through the graph (:mod:`lightning_sphere.detection.walk`) and works out, operation by operation, how
every value scales when the layer's output channels are scaled (docs/theory.md §1). A normalization is
recognized by what it computes, not by its class: a value that scaled with the layer becomes one that does not
(``x * rsqrt(mean(x²) + eps)``, ``(x - mean) / std``, or a fused ``layer_norm``/``group_norm``/``batch_norm``
node), and the dimensions it reduces over decide which channels must scale together. The layer is a candidate
when nothing that still scales with it reaches the loss. Models with data-dependent control flow are fine: the
graph is the one the real batch built.

Groups are the channels tied together, rounded up to equal runs of consecutive channels: one per channel after
BatchNorm or InstanceNorm, per channel group after GroupNorm, per head after a QK-norm, the whole layer after a
LayerNorm or RMSNorm over its output.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.autograd.graph import Node
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from lightning_sphere.core.groups import InvariantGroups, ParamSlice
from lightning_sphere.core.names import class_name, named_parameters
from lightning_sphere.core.sharding import unsharded_aliases
from lightning_sphere.detection.parametrized import Stored, read_scaling, stored_weight
from lightning_sphere.detection.recorder import CHANNEL_NORMS, LAYERS, _Call, _Graph, _NormNamer
from lightning_sphere.detection.scaling import ChannelTies, NormReached
from lightning_sphere.detection.walk import ScalingWalk


@dataclass
class Candidates:
    """What :func:`find_candidates` found: unverified groups, and why other layers were left out."""

    groups: list[InvariantGroups] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)


class GraphRoot(Protocol):
    """What :func:`find_candidates` reads of a root: its autograd node (a tensor's, or a node given alone)."""

    @property
    def grad_fn(self) -> Node | None: ...


def find_candidates(
    calls: Sequence[_Call], roots: Sequence[GraphRoot], model: nn.Module, exclude: Collection[nn.Module] = ()
) -> Candidates:
    """Layers whose output reaches the loss only through normalizations that cancel its scale (§1 table).

    Args:
        calls: what a :class:`DataflowRecorder` saw during the forward pass that built ``roots``.
        roots: the loss, or the model's outputs.
        model: the model, for parameter names.
        exclude: layers found another way (weight normalization), to leave alone.
    """
    graph = _Graph([r.grad_fn for r in roots if r.grad_fn is not None])
    scalar = all(tuple(getattr(r, "shape", (2,))) == () for r in roots)  # a loss; else the model's outputs
    graph.output = "the loss" if scalar else "the model's output"
    for sharded, unsharded in unsharded_aliases(model).items():  # FSDP2: the graph holds the unsharded copies
        if unsharded in graph.leaf:
            graph.leaf.setdefault(sharded, graph.leaf[unsharded])
    layer_calls: dict[nn.Module, list[_Call]] = defaultdict(list)
    found = Candidates()
    for call in calls:
        if not isinstance(call.module, LAYERS) or call.module in exclude:
            continue
        stored = stored_weight(call.module)
        if stored is None:
            found.rejected[call.name] = "weight is not a parameter: no optimizer steps it"
        elif len(stored.params) > 1:
            found.rejected[call.name] = (
                f"weight computed by {stored.computed_by} from {len(stored.params)} tensors, which is not followed"
            )
        elif call.output is not None and call.output in graph.nodes:
            layer_calls[call.module].append(call)
        elif not stored.params[0].requires_grad:
            found.rejected[call.name] = "weight is frozen"
    param_names = {p: n for n, p in named_parameters(model)}
    namer = _NormNamer(calls)
    for module, module_calls in layer_calls.items():
        name = module_calls[0].name
        result = _layer_groups(name, module, module_calls, graph, namer, param_names)
        if isinstance(result, str):
            found.rejected[name] = result
        else:
            found.groups.append(result)
    return found


def _layer_groups(
    name: str,
    layer: nn.Module,
    calls: Sequence[_Call],
    graph: _Graph,
    namer: _NormNamer,
    names: dict[nn.Parameter, str],
) -> InvariantGroups | str:
    """The groups of one layer, or why it has none.

    The groups hold the tensor the optimizer steps. When something computes the weight from it (a
    parametrization, pruning, the older spectral norm: :mod:`lightning_sphere.detection.parametrized`, docs/theory.md
    §1.1), the groups the layer's output decides hold for the stored tensor if scaling its output channels
    scales the computed weight's by positive factors up to one common to all (a mask, spectral normalization),
    and, where the bias joins the groups, exactly as the bias scales (a mask). Else a normalization per
    channel inside the parametrization makes each channel invariant, or a computed weight that ignores the
    stored tensor's scale (spectral normalization) makes the whole tensor one group, whatever follows.
    """
    stored = stored_weight(layer)
    assert stored is not None and len(stored.params) == 1  # find_candidates keeps only such layers
    weight = stored.params[0]
    transposed = isinstance(layer, _ConvTransposeNd)
    channels = _out_channels(layer)
    if stored.computed_by is None:
        # Weight standardization: the weight is normalized per output channel before the layer uses it.
        standardized = _standardized(weight, calls, graph, channels, transposed)
        return _structural_groups(name, layer, weight, calls, graph, namer, names, standardized)
    computed = next((c.weight for c in calls if c.weight is not None), None)
    if computed is None:
        return f"weight computed by {stored.computed_by} outside the layer's call, where it cannot be read"
    scaling = read_scaling(computed, weight, _weight_channel_ids(layer, tuple(weight.shape)))
    walked = _structural_groups(name, layer, weight, calls, graph, namer, names, None)
    with_bias = isinstance(walked, InvariantGroups) and len(walked.slices) > 1
    if scaling.channels and isinstance(walked, InvariantGroups) and (scaling.exact or not with_bias):
        # A common factor (spectral norm) moves the norm's input with the whole stored tensor, not group by
        # group: its running statistics cannot follow a group's scale (channels_aligned says they can).
        return walked if scaling.exact else replace(walked, channels_aligned=False)
    standardized = _standardized(weight, calls, graph, channels, transposed)
    if standardized is not None:  # normalized channel by channel inside the parametrization
        return _structural_groups(name, layer, weight, calls, graph, namer, names, standardized)
    if scaling.scale_free:
        return _check_params(layer, weight, calls, graph, names, with_bias=False) or _scale_free(
            name, weight, stored, names
        )
    if isinstance(walked, str):
        return walked
    what = "output channels (dim 1)" if transposed else "rows"
    if not scaling.channels:
        return (
            f"weight computed by {stored.computed_by}, whose output does not scale with the {what} of "
            f"`{names[weight]}` (they mix in {scaling.mixed_at})"
        )
    return (
        f"weight computed by {stored.computed_by}, whose output scales with the {what} of `{names[weight]}` only "
        f"up to a factor common to all of them, while the bias `{walked.slices[1].name}` joins the groups and "
        "scales exactly"
    )


def _scale_free(name: str, weight: nn.Parameter, stored: Stored, names: dict[nn.Parameter, str]) -> InvariantGroups:
    """The whole stored tensor as one group, named after what computes the weight from it: its scale does not
    reach the weight at all (spectral normalization, W = V/σ(V))."""
    return InvariantGroups(
        module_name=name,
        slices=(ParamSlice(names[weight], weight, ()),),
        num_groups=1,
        norm_name=f"{name}.{stored.module}" if stored.module else "",
        norm_type=stored.kind,
        granularity="layer",
    )


def _weight_channel_ids(layer: nn.Module, shape: tuple[int, ...]) -> Tensor:
    """The layer's output channel of every entry of a tensor shaped like its weight."""
    if not isinstance(layer, _ConvTransposeNd):
        return _channel_ids(shape, 0, shape[0])
    # (C_in, C_out / groups, *k): output channel (group of the input channel, j)
    per_group = shape[1]
    group = torch.arange(shape[0], dtype=torch.int32) // max(shape[0] // layer.groups, 1)
    ids = group[:, None] * per_group + torch.arange(per_group, dtype=torch.int32)
    return ids.view(*shape[:2], *[1] * (len(shape) - 2)).expand(shape)


def _structural_groups(
    name: str,
    layer: nn.Module,
    weight: nn.Parameter,
    calls: Sequence[_Call],
    graph: _Graph,
    namer: _NormNamer,
    names: dict[nn.Parameter, str],
    standardized: tuple[ChannelTies, list[NormReached]] | None,
) -> InvariantGroups | str:
    """The groups the layer's output (or its standardized weight) decides, on ``weight``, or why it has none."""
    transposed = isinstance(layer, _ConvTransposeNd)
    channels = _out_channels(layer)
    bias_stored = stored_weight(layer, "bias")
    bias = bias_stored.params[0] if bias_stored is not None and bias_stored.computed_by is None else None
    if standardized is not None:
        ties, norms = standardized
        with_bias = False
    else:
        ties = ChannelTies(channels)
        norms, broken, reasons = [], set(), []
        for call in calls:
            dim = 1 if isinstance(layer, _ConvNd) else len(call.shape) - 1
            if not call.shape or call.shape[dim] != channels:
                return "its output does not hold its channels where expected"
            assert call.output is not None  # find_candidates keeps the calls whose output is in the graph
            walk = ScalingWalk(graph, ties, namer)
            norms += walk.run(call.output, _channel_ids(call.shape, dim, channels))
            broken |= walk.broken
            reasons.append(walk.reason)
        if not norms:
            return next((r for r in reasons if r), "output reaches no normalization")
        if bias_stored is not None and bias_stored.computed_by is not None and not all(n.cancels_shift for n in norms):
            return f"bias computed by {bias_stored.computed_by}, which is not followed"
        with_bias = bias is not None and not all(n.cancels_shift for n in norms)
    reason = _check_params(layer, weight, calls, graph, names, with_bias)
    if reason:
        return reason
    kept = None
    if standardized is None and broken:
        kept = _kept_range(ties, channels, broken)
        if kept is None or transposed or (isinstance(layer, _ConvNd) and layer.groups != 1):
            return next(r for r in reasons if r)
    start, stop = kept or (0, channels)
    per_group = _group_size(ties, channels, start, stop)
    num_groups = (stop - start) // per_group
    if kept is not None:
        pieces = [ParamSlice(names[weight], weight, channels=kept)]
    elif isinstance(layer, _ConvTransposeNd):
        # weight is (C_in, C_out / groups, *k): output channel (group, j) once dim 0 is split.
        split = layer.groups
        pieces = [ParamSlice(names[weight], weight, (0, 2) if split > 1 else (1,), split)]
    else:
        pieces = [ParamSlice(names[weight], weight)]
    if with_bias and bias is not None:  # with_bias implies a bias
        pieces.append(ParamSlice(names[bias], bias, channels=kept))
    norm_call = namer(norms[0].node)
    norm_modules = {id(call.module) if call else None for call in (namer(n.node) for n in norms)}
    return InvariantGroups(
        module_name=name,
        slices=tuple(pieces),
        num_groups=num_groups,
        norm_name=norm_call.name if norm_call else name,
        norm_type=class_name(norm_call.module) if norm_call else class_name(layer),
        granularity="channel" if per_group == 1 else "layer" if num_groups == 1 else f"{per_group} channels",
        channels_aligned=per_group == 1
        and standardized is None
        and kept is None
        and len(norm_modules) == 1
        and norm_call is not None
        and isinstance(norm_call.module, CHANNEL_NORMS)
        and all(n.fused_channel_norm and n.channels_kept for n in norms),
    )


def _out_channels(layer: nn.Module) -> int:
    """The output channels of one of the :data:`LAYERS`."""
    if isinstance(layer, _ConvNd):
        return layer.out_channels
    assert isinstance(layer, nn.Linear)  # find_candidates keeps the LAYERS alone
    return layer.out_features


def _channel_ids(shape: Sequence[int], dim: int, channels: int) -> Tensor:
    view = [1] * len(shape)
    view[dim] = channels
    return torch.arange(channels, dtype=torch.int32).view(view).expand(*shape)


def _group_size(ties: ChannelTies, channels: int, start: int = 0, stop: int | None = None) -> int:
    """The smallest run of consecutive channels, dividing the channels ``start:stop``, that holds every tied
    set among them whole."""
    stop = channels if stop is None else stop
    count = stop - start
    roots = [ties.find(c) for c in range(start, stop)]
    for size in range(1, count + 1):
        if count % size:
            continue
        block: dict[int, int] = {}
        if all(block.setdefault(r, c // size) == c // size for c, r in enumerate(roots)):
            return size
    return count


def _kept_range(ties: ChannelTies, channels: int, broken: set[int]) -> tuple[int, int] | None:
    """The channels whose scale never reaches the loss, when they are one run ``(start, stop)`` of at least
    two channels not tied to a broken one (the q and k rows of a fused qkv projection); else ``None``."""
    lost = {ties.find(c) for c in broken}
    fine = [c for c in range(channels) if ties.find(c) not in lost]
    if len(fine) < 2 or fine[-1] - fine[0] + 1 != len(fine):
        return None
    return fine[0], fine[-1] + 1


def _standardized(
    weight: Tensor, calls: Sequence[_Call], graph: _Graph, channels: int, transposed: bool
) -> tuple[ChannelTies, list[NormReached]] | None:
    """Ties and normalizations when the layer's weight (``weight``, the tensor stored and stepped) is normalized
    per output channel before its use (weight standardization, in the layer's forward or in a
    parametrization), so that the layer is invariant whatever follows; else ``None``."""
    leaf = graph.leaf.get(weight)
    if leaf is None:
        return None
    inside = set().union(*(c.interior() for c in calls))
    ties = ChannelTies(channels)
    walk = ScalingWalk(graph, ties, lambda node: None, inside=inside)
    shape = tuple(weight.shape)
    norms = walk.run(leaf, _channel_ids(shape, 1 if transposed else 0, shape[1 if transposed else 0]))
    return (ties, norms) if norms and not walk.broken else None


def _check_params(
    layer: nn.Module,
    weight: nn.Parameter,
    calls: Sequence[_Call],
    graph: _Graph,
    names: dict[nn.Parameter, str],
    with_bias: bool,
) -> str | None:
    """Why the layer's parameters (``weight``: the stored one) cannot form groups (frozen, or used outside the
    layer), if they cannot."""
    if not weight.requires_grad:
        return "weight is frozen"
    stored = stored_weight(layer, "bias")
    bias = stored.params[0] if stored is not None and stored.computed_by is None else None
    if with_bias and bias is not None and not bias.requires_grad:
        return "bias is frozen but not cancelled by the normalization"
    inside = set().union(*(c.interior() for c in calls))
    for p in [t for t in (weight, bias) if t is not None]:
        leaf = graph.leaf.get(p)
        if leaf is not None and any(user not in inside for user in graph.consumers.get(leaf, ())):
            return f"{names[p]} is also used outside {calls[0].name}"
    return None
