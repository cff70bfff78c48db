"""Candidate invariant groups, read off the autograd graph of one real forward pass.

No symbolic tracing: :class:`DataflowRecorder` notes, for every call of a layer or a normalization
module, the autograd nodes of its input and output; :func:`find_candidates` then follows each layer's
output forward through the graph. The output must reach a normalization in training mode through
positively homogeneous operations only, and be used by nothing else (THEORY.md §1). Models with
data-dependent control flow are fine: the graph is the one the real batch built.

The normalization decides the groups (§1 table): one per output channel after BatchNorm, SyncBatchNorm
or InstanceNorm; one per channel group after GroupNorm; the whole layer after a LayerNorm or RMSNorm
over its output, or one per head when the norm covers one head's features (QK-norm).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.autograd.graph import Node
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.utils import parametrize

from lightning_sphere.groups import InvariantGroups, ParamSlice

LAYERS = (_ConvNd, nn.Linear)
CHANNEL_NORMS = (_BatchNorm, _InstanceNorm)
NORMS = (*CHANNEL_NORMS, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)

#: Autograd nodes of operations that are positively homogeneous of degree 1 in their (single) input on
#: the path, f(ρx) = ρ f(x) for ρ > 0, and that commute with adding a per-channel constant, so that the
#: normalization still cancels the layer's bias: pooling, means, resampling, views, casts.
SHIFT_COMMUTING = frozenset(
    {
        "MaxPool2DWithIndicesBackward0",
        "MaxPool3DWithIndicesBackward0",
        "AvgPool2DBackward0",
        "AvgPool3DBackward0",
        "AdaptiveAvgPool2DBackward0",
        "AdaptiveAvgPool3DBackward0",
        "AdaptiveMaxPool2DBackward0",
        "AdaptiveMaxPool3DBackward0",
        "MeanBackward0",
        "MeanBackward1",
        "SumBackward0",
        "SumBackward1",
        "AmaxBackward0",
        "MaxBackward0",
        "UpsampleNearest1DBackward0",
        "UpsampleNearest2DBackward0",
        "UpsampleNearest3DBackward0",
        "UpsampleBilinear2DBackward0",
        "ViewBackward0",
        "UnsafeViewBackward0",
        "PermuteBackward0",
        "TransposeBackward0",
        "TBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "SqueezeBackward2",
        "UnsqueezeBackward0",
        "ExpandBackward0",
        "AliasBackward0",
        "CloneBackward0",
        "ToCopyBackward0",
    }
)
#: Positively homogeneous operations that do not commute with a shift: after them the bias is no longer
#: cancelled, and it joins its channel's group (scaling weight and bias together is still invariant).
SHIFT_BREAKING = frozenset({"ReluBackward0", "LeakyReluBackward0", "PreluKernelBackward0", "NativeDropoutBackward0"})
HOMOGENEOUS = SHIFT_COMMUTING | SHIFT_BREAKING
#: Products: homogeneous in the path operand when the other factor does not depend on it (which the
#: single-use rule guarantees) — dropout masks, gates, constant scales. Division only as numerator.
SCALING = frozenset({"MulBackward0", "DivBackward0"})
#: The operations on the path that keep every channel where it is (element-wise, or over space only):
#: after them, channel c of the normalization is output channel c of the layer.
CHANNEL_KEEPING = (
    SHIFT_BREAKING
    | SCALING
    | {op for op in SHIFT_COMMUTING if op.startswith(("MaxPool", "AvgPool", "Adaptive", "Upsample"))}
    | {"AliasBackward0", "CloneBackward0", "ToCopyBackward0"}
)
#: Longest chain of homogeneous operations followed from a layer to its normalization.
_MAX_PATH = 64


@dataclass(eq=False)
class _Call:
    """One forward call of a recorded module."""

    name: str
    module: nn.Module
    input: Node | None
    output: Node | None
    training: bool

    def interior(self) -> set[Node]:
        """The nodes this call created: everything reachable from its output before its input."""
        inside: set[Node] = set()
        stack = [self.output] if self.output is not None else []
        while stack:
            node = stack.pop()
            if node in inside or node is self.input or hasattr(node, "variable"):
                continue
            inside.add(node)
            stack.extend(child for child, _ in node.next_functions if child is not None)
        return inside


class DataflowRecorder:
    """Records the calls of the layers and normalizations of ``model`` while active (a context manager).

    ``layers``: only these layers, e.g. those not analyzed yet; default all. The normalizations are hooked
    once one of them has been called (only the normalizations that follow a layer can be its own): until
    then, a forward pass that calls none of them runs no recording code at all.
    """

    def __init__(self, model: nn.Module, layers: Collection[nn.Module] | None = None) -> None:
        self.model = model
        self.layers = None if layers is None else set(layers)
        self.calls: list[_Call] = []
        self._handles: list[Any] = []
        self._norms_hooked = False

    def __enter__(self) -> DataflowRecorder:
        for name, module in self.model.named_modules():
            if isinstance(module, LAYERS) and (self.layers is None or module in self.layers):
                self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._norms_hooked = False

    def _hook_norms(self) -> None:
        self._norms_hooked = True
        for name, module in self.model.named_modules():
            if isinstance(module, NORMS):
                self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            first = args[0] if args and isinstance(args[0], Tensor) else None
            if isinstance(output, Tensor) and first is not None:
                self.calls.append(_Call(name, module, first.grad_fn, output.grad_fn, module.training))
                if not self._norms_hooked and self._handles:
                    self._hook_norms()

        return record


@dataclass
class Candidates:
    """What :func:`find_candidates` found: unverified groups, and why other layers were left out."""

    groups: list[InvariantGroups] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)


class _Graph:
    """The autograd graph reachable from some roots, with each node's consumers."""

    def __init__(self, roots: Sequence[Node]) -> None:
        self.consumers: dict[Node, list[Node]] = defaultdict(list)
        self.leaf: dict[Tensor, Node] = {}
        seen: set[Node] = set()
        stack = list(roots)
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            variable = getattr(node, "variable", None)
            if variable is not None:
                self.leaf[variable] = node
            for child, _ in node.next_functions:
                if child is not None:
                    self.consumers[child].append(node)
                    stack.append(child)
        self.nodes = seen


def find_candidates(
    calls: Sequence[_Call], roots: Sequence[Tensor], model: nn.Module, exclude: Collection[nn.Module] = ()
) -> Candidates:
    """Layers whose output reaches a normalization through homogeneous operations only (§1 table).

    Args:
        calls: what a :class:`DataflowRecorder` saw during the forward pass that built ``roots``.
        roots: the loss, or the model's outputs.
        model: the model, for parameter names.
        exclude: layers found another way (weight normalization), to leave alone.
    """
    graph = _Graph([r.grad_fn for r in roots if r.grad_fn is not None])
    norm_calls = {c.input: c for c in calls if isinstance(c.module, NORMS) and c.input is not None}
    layer_calls: dict[nn.Module, list[_Call]] = defaultdict(list)
    found = Candidates()
    for call in calls:
        if not isinstance(call.module, LAYERS) or call.module in exclude:
            continue
        if parametrize.is_parametrized(call.module, "weight") or not isinstance(call.module.weight, nn.Parameter):
            found.rejected[call.name] = "weight is computed by a parametrization other than weight_norm"
        elif call.output in graph.nodes:
            layer_calls[call.module].append(call)
        elif not call.module.weight.requires_grad:
            found.rejected[call.name] = "weight is frozen"
    param_names = {p: n for n, p in model.named_parameters()}
    for module, module_calls in layer_calls.items():
        name = module_calls[0].name
        result = _layer_groups(name, module, module_calls, graph, norm_calls, param_names)
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
    norm_calls: dict[Node, _Call],
    names: dict[Tensor, str],
) -> InvariantGroups | str:
    """The groups of one layer, or why it has none: every call must reach the same kind of grouping."""
    paths = [_follow(call.output, graph, norm_calls) for call in calls]
    broken = next((p.reason for p in paths if p.norm is None), None)
    if broken:
        return broken
    channels = layer.out_channels if isinstance(layer, _ConvNd) else layer.out_features
    groupings = {_grouping(p.norm, channels) for p in paths}
    if len(groupings) > 1:
        return "its calls are normalized into different groups"
    grouping = groupings.pop()
    if isinstance(grouping, str):
        return grouping
    num_groups, shift_cancelled = grouping
    with_bias = getattr(layer, "bias", None) is not None and not (
        shift_cancelled and all(p.bias_cancelled for p in paths)
    )
    reason = _check_params(layer, calls, graph, names, with_bias)
    if reason:
        return reason
    weight = layer.weight
    if isinstance(layer, _ConvTransposeNd):
        # weight is (C_in, C_out / groups, *k): output channel (group, j) once dim 0 is split.
        split = layer.groups
        pieces = [ParamSlice(names[weight], weight, (0, 2) if split > 1 else (1,), split)]
    else:
        pieces = [ParamSlice(names[weight], weight)]
    if with_bias:
        pieces.append(ParamSlice(names[layer.bias], layer.bias))
    norm = paths[0].norm
    per_group = channels // num_groups
    return InvariantGroups(
        module_name=name,
        slices=tuple(pieces),
        num_groups=num_groups,
        norm_name=norm.name,
        norm_type=type(norm.module).__name__,
        granularity="channel" if per_group == 1 else "layer" if num_groups == 1 else f"{per_group} channels",
        channels_aligned=per_group == 1
        and isinstance(norm.module, CHANNEL_NORMS)
        and all(p.channels_kept and p.norm.module is norm.module for p in paths),
    )


def _grouping(norm: _Call, channels: int) -> tuple[int, bool] | str:
    """How many groups a normalization makes of a layer's ``channels`` output channels, and whether it
    cancels a per-channel shift (the layer's bias), or why it makes none (§1 table).

    BatchNorm and InstanceNorm normalize each channel: one group per channel, shifts cancelled. GroupNorm
    normalizes each run of ``C/G`` channels together. LayerNorm and RMSNorm normalize the trailing
    ``normalized_shape``: the whole output (one group), or one head of it when the layer's features are
    viewed as heads of that size (QK-norm: one group per head). These keep the bias in the groups.
    """
    module = norm.module
    if isinstance(module, CHANNEL_NORMS):
        return channels, True
    if isinstance(module, nn.GroupNorm):
        if module.num_channels != channels:
            return f"{norm.name} normalizes {module.num_channels} channels, not its {channels} output channels"
        return module.num_groups, False
    size = math.prod(module.normalized_shape)
    if size < channels and channels % size == 0:
        return channels // size, False
    if size % channels == 0:
        return 1, False
    return f"{norm.name} normalizes groups of {size} features, which do not tile its {channels} output channels"


@dataclass
class _Path:
    """Where a layer's output goes: the normalization it reaches, or why it does not."""

    norm: _Call | None
    reason: str = ""
    bias_cancelled: bool = True  # the normalization still cancels the layer's bias
    channels_kept: bool = True  # no operation on the way moves or mixes channels


def _follow(node: Node, graph: _Graph, norm_calls: dict[Node, _Call]) -> _Path:
    """Walk forward from a layer's output to the normalization it feeds, or say why it does not."""
    bias_cancelled = channels_kept = True
    for _ in range(_MAX_PATH):
        norm = norm_calls.get(node)
        users = graph.consumers.get(node, [])
        if norm is not None:
            if not _normalizes(norm.module, norm.training):
                return _Path(None, f"{norm.name} ({type(norm.module).__name__}) uses running statistics (eval mode)")
            interior = norm.interior()
            if all(user in interior for user in users):
                return _Path(norm, bias_cancelled=bias_cancelled, channels_kept=channels_kept)
            return _Path(None, "output is used besides the normalization")
        if len(users) != 1:
            return _Path(None, "output is used besides the normalization" if users else "output is not normalized")
        user = users[0]
        op = user.name()
        edges = [child for child, _ in user.next_functions if child is node]
        scaling = op in SCALING and (op == "MulBackward0" or user.next_functions[0][0] is node)
        if not (op in HOMOGENEOUS or scaling) or len(edges) != 1:
            return _Path(None, f"output reaches {op.removesuffix('Backward0')} before any normalization")
        bias_cancelled &= op in SHIFT_COMMUTING
        channels_kept &= op in CHANNEL_KEEPING
        node = user
    return _Path(None, "output is not normalized")


def _check_params(
    layer: nn.Module, calls: Sequence[_Call], graph: _Graph, names: dict[Tensor, str], with_bias: bool
) -> str | None:
    """Why the layer's parameters cannot form groups (frozen, or used outside the layer), if they cannot."""
    if not layer.weight.requires_grad:
        return "weight is frozen"
    bias = getattr(layer, "bias", None)
    if with_bias and bias is not None and not bias.requires_grad:
        return "bias is frozen but not cancelled by the normalization"
    inside = set().union(*(c.interior() for c in calls))
    for p in (layer.weight, bias):
        if p is not None and any(user not in inside for user in graph.consumers.get(graph.leaf.get(p), ())):
            return f"{names[p]} is also used outside {calls[0].name}"
    return None


def _normalizes(norm: nn.Module, training: bool) -> bool:
    """Whether the normalization uses the statistics of its input (training mode, or no running stats)."""
    return training or not getattr(norm, "track_running_stats", False)
