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
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.autograd.graph import Node
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from lightning_sphere.core.groups import InvariantGroups, ParamSlice
from lightning_sphere.core.names import class_name, named_modules, named_parameters
from lightning_sphere.core.sharding import unsharded_aliases
from lightning_sphere.detection.channels import (
    align_companions,
    companion_slice,
    group_size,
    kept_channels,
    rows_slice,
    scattered,
    walk_parts,
)
from lightning_sphere.detection.parametrized import Stored, read_scaling, stored_weight
from lightning_sphere.detection.recorder import CHANNEL_NORMS, EMBEDDINGS, LAYERS, WATCHED, _Call, _Graph, _NormNamer
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
    calls: Sequence[_Call],
    roots: Sequence[GraphRoot],
    model: nn.Module,
    exclude: Collection[nn.Module] = (),
    uses: Collection[str] | None = None,
    biases: Mapping[Node, list[Tensor]] | None = None,
) -> Candidates:
    """Layers whose output reaches the loss only through normalizations that cancel its scale (§1 table).

    A layer is followed from its recorded calls; one whose weight the graph holds but that was not called (its
    weight used outside its forward, ``F.linear(x, self.qkv.weight, bias)``), an ``nn.Embedding``, and a layer
    whose weight is also used outside its calls are followed from the weight itself, through every use of it
    (docs/theory.md §1.3).

    Args:
        calls: what a :class:`DataflowRecorder` saw during the forward pass that built ``roots``.
        roots: the loss, or the model's outputs.
        model: the model, for parameter names.
        exclude: layers found another way (weight normalization), to leave alone.
        uses: the names of the modules that may be followed from their weight (``None``: every one).
        biases: the values of the biases built on the spot, by node (:attr:`DataflowRecorder.biases`).
    """
    graph = _Graph([r.grad_fn for r in roots if r.grad_fn is not None])
    graph.bias_values = biases or {}
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
    for sharded, unsharded in unsharded_aliases(model).items():  # a bias read off the graph is the unsharded copy
        if isinstance(sharded, nn.Parameter) and isinstance(unsharded, nn.Parameter) and sharded in param_names:
            param_names.setdefault(unsharded, param_names[sharded])
    namer = _NormNamer(calls)
    for module, module_calls in layer_calls.items():
        name = module_calls[0].name
        result = _layer_groups(name, module, module_calls, graph, namer, param_names)
        stored = stored_weight(module)
        if isinstance(result, str) and result.endswith(f" is also used outside {name}") and stored is not None:
            leaf = graph.leaf.get(stored.params[0])
            alone = _from_weight(name, module, leaf, graph, namer, param_names) if leaf is not None else result
            result = alone if isinstance(alone, InvariantGroups) else result
        if isinstance(result, str):
            found.rejected[name] = result
        else:
            found.groups.append(result)
    called = set(layer_calls) | set(exclude)
    for name, module in named_modules(model):
        if module in called or not isinstance(module, WATCHED) or (uses is not None and name not in uses):
            continue
        stored = stored_weight(module)
        if stored is None or stored.computed_by is not None or not stored.params[0].requires_grad:
            continue
        leaf = graph.leaf.get(stored.params[0])
        if leaf is not None:  # used in this graph, not by a call of its own
            result = _from_weight(name, module, leaf, graph, namer, param_names)
            if isinstance(result, str):
                found.rejected[name] = result
            else:
                found.groups.append(result)
    return found


def _from_weight(
    name: str, layer: nn.Module, leaf: Node, graph: _Graph, namer: _NormNamer, names: dict[nn.Parameter, str]
) -> InvariantGroups | str:
    """The groups of a layer followed from its weight's ``AccumulateGrad`` node through every use of it, the
    bias added to its rows included (:meth:`~lightning_sphere.detection.walk.ScalingWalk.add_bias`)."""
    if isinstance(layer, _ConvTransposeNd):
        return "weight used outside its module's forward, as a transposed convolution's, which is not followed"
    weight = stored_weight(layer)
    assert weight is not None  # find_candidates follows plain weights alone
    return _structural_groups(name, layer, weight.params[0], (), graph, namer, names, None, start=leaf)


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
    if not isinstance(layer, _ConvTransposeNd):  # (C_out, C_in / groups, *k), an embedding's (V, D)
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
    start: Node | None = None,
) -> InvariantGroups | str:
    """The groups the layer's output (or its standardized weight) decides, on ``weight``, or why it has none.
    ``start``: the weight's ``AccumulateGrad`` node, to follow the weight itself (not ``calls``); the bias
    entries added to its rows join the groups (:attr:`ScalingWalk.companions`)."""
    transposed = isinstance(layer, _ConvTransposeNd)
    channels = _out_channels(layer)
    bias_stored = stored_weight(layer, "bias")
    bias = bias_stored.params[0] if bias_stored is not None and bias_stored.computed_by is None else None
    companions: dict[Tensor, dict[int, int]] = {}
    broken: set[int] = set()
    reasons: list[str] = []
    if standardized is not None:
        ties, norms = standardized
        with_bias = False
    else:
        if start is not None:
            starts = [(start, _weight_channel_ids(layer, tuple(weight.shape)))]
        else:
            starts = []
            for call in calls:
                dim = 1 if isinstance(layer, _ConvNd) else len(call.shape) - 1
                if not call.shape or call.shape[dim] != channels:
                    return "its output does not hold its channels where expected"
                assert call.output is not None  # find_candidates keeps the calls whose output is in the graph
                starts.append((call.output, _channel_ids(call.shape, dim, channels)))
        walked = walk_parts(starts, graph, namer, channels)
        ties, norms, broken, reasons, companions = (
            walked.ties,
            walked.norms,
            walked.broken,
            walked.reasons,
            walked.companions,
        )
        if not norms:
            return next((r for r in reasons if r), "output reaches no normalization")
        if start is not None:
            with_bias = False  # the bias added to the weight's rows is among the companions
        else:
            if (
                bias_stored is not None
                and bias_stored.computed_by is not None
                and not all(n.cancels_shift for n in norms)
            ):
                return f"bias computed by {bias_stored.computed_by}, which is not followed"
            with_bias = bias is not None and not all(n.cancels_shift for n in norms)
    reason = _check_params(layer, weight, calls, graph, names, with_bias) if start is None else None
    if reason:
        return reason
    kept = None
    broken = align_companions(ties, channels, broken, companions) if companions else broken
    if standardized is None and broken:
        kept = kept_channels(ties, channels, broken)
        if kept is None or transposed:
            return next(r for r in reasons if r) + scattered(ties, channels, broken)
    first, stop, period = kept or (0, channels, channels)
    order = [k * period + c for k in range(channels // period) for c in range(first, stop)]
    per_group = group_size(ties, order)
    num_groups = len(order) // per_group
    split = channels // period
    rows = None if kept is None else (first, stop)
    if kept is not None:
        pieces = [rows_slice(names[weight], weight, rows, split)]
    elif isinstance(layer, _ConvTransposeNd):
        # weight is (C_in, C_out / groups, *k): output channel (group, j) once dim 0 is split.
        split = layer.groups
        pieces = [ParamSlice(names[weight], weight, (0, 2) if split > 1 else (1,), split)]
    else:
        pieces = [ParamSlice(names[weight], weight)]
    if with_bias and bias is not None:  # with_bias implies a bias
        pieces.append(rows_slice(names[bias], bias, rows, split))
    for param, joined in companions.items():
        piece = companion_slice(names, param, joined, set(order), rows, split)
        if isinstance(piece, str):
            return piece
        if piece is not None:
            pieces.append(piece)
    norm_call = namer(norms[0].node)
    norm_modules = {id(call.module) if call else None for call in (namer(n.node) for n in norms)}
    return InvariantGroups(
        module_name=name,
        slices=tuple(pieces),
        num_groups=num_groups,
        norm_name=norm_call.name if norm_call else name,
        norm_type=class_name(norm_call.module) if norm_call else class_name(layer),
        granularity=_granularity(layer, per_group, num_groups),
        channels_aligned=per_group == 1
        and standardized is None
        and kept is None
        and len(norm_modules) == 1
        and norm_call is not None
        and isinstance(norm_call.module, CHANNEL_NORMS)
        and all(n.fused_channel_norm and n.channels_kept for n in norms),
        norm_count=min((n.count for n in norms if n.count is not None), default=None),
        unknown_eps=next((n.constant_at for n in norms if n.constant_at), ""),
    )


def _granularity(layer: nn.Module, per_group: int, num_groups: int) -> str:
    """``"channel"``, ``"layer"`` or ``"<k> channels"``; an embedding's rows are ``"row"``/``"<k> rows"``."""
    unit = "row" if isinstance(layer, EMBEDDINGS) else "channel"
    return unit if per_group == 1 else "layer" if num_groups == 1 else f"{per_group} {unit}s"


def _out_channels(layer: nn.Module) -> int:
    """The output channels of one of the :data:`WATCHED` modules (the rows of an embedding)."""
    if isinstance(layer, EMBEDDINGS):
        return layer.num_embeddings
    if isinstance(layer, _ConvNd):
        return layer.out_channels
    assert isinstance(layer, nn.Linear)  # find_candidates keeps the WATCHED alone
    return layer.out_features


def _channel_ids(shape: Sequence[int], dim: int, channels: int) -> Tensor:
    view = [1] * len(shape)
    view[dim] = channels
    return torch.arange(channels, dtype=torch.int32).view(view).expand(*shape)


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
