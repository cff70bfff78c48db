"""Candidate invariant groups, read off the autograd graph of one real forward pass.

No symbolic tracing: :class:`DataflowRecorder` notes, for every module call, the autograd nodes of its
input and output; :func:`find_candidates` then follows each layer's output forward through the graph and
works out, operation by operation, how every value scales when the layer's output channels are scaled
(docs/theory.md §1). A normalization is recognized by what it computes, not by its class: a value that scaled
with the layer becomes one that does not (``x * rsqrt(mean(x²) + eps)``, ``(x - mean) / std``, or a fused
``layer_norm``/``group_norm``/``batch_norm`` node), and the dimensions it reduces over decide which channels
must scale together. The layer is a candidate when nothing that still scales with it reaches the loss.
Models with data-dependent control flow are fine: the graph is the one the real batch built.

Each value on the way is tracked as a degree ``k`` (it scales by ``ρ**k``) and, entry by entry, the output
channel it scales with (``-1``: it does not depend on the layer). Operations that reduce or contract over
entries of several channels (a mean, a matrix product, a normalization) tie those channels into one group.
Groups are then the channels tied together, rounded up to equal runs of consecutive channels: one per
channel after BatchNorm or InstanceNorm, per channel group after GroupNorm, per head after a QK-norm, the
whole layer after a LayerNorm or RMSNorm over its output.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import Node
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.utils import parametrize

from lightning_sphere.distributed import unsharded_aliases
from lightning_sphere.groups import InvariantGroups, ParamSlice
from lightning_sphere.names import named_modules, named_parameters
from lightning_sphere.parametrized import Stored, computed_node, graph_below, read_scaling, stored_weight

LAYERS = (_ConvNd, nn.Linear)
CHANNEL_NORMS = (_BatchNorm, _InstanceNorm)

#: Element-wise operations positively homogeneous of any degree, f(ρx) = ρ f(x) for ρ > 0, that commute
#: with adding a per-channel constant (so that a centering normalization still cancels the layer's bias).
_ELEMENTWISE_SHIFT_COMMUTING = frozenset({"AliasBackward0", "CloneBackward0", "ToCopyBackward0"})
#: Positively homogeneous element-wise operations that do not commute with a shift: after them the bias
#: is no longer cancelled, and it joins its channel's group.
_ELEMENTWISE_SHIFT_BREAKING = frozenset(
    {"ReluBackward0", "LeakyReluBackward0", "NativeDropoutBackward0", "AbsBackward0", "NegBackward0"}
)
#: Views: they only move entries (the output shape comes from the node's metadata).
_RESHAPES = frozenset(
    {
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "SqueezeBackward2",
        "UnsqueezeBackward0",
    }
)
#: Spatial operations that keep channels apart (dims 0 and 1 of an ``(N, C, *)`` tensor).
_SPATIAL = frozenset(
    {
        "MaxPool1DWithIndicesBackward0",
        "MaxPool2DWithIndicesBackward0",
        "MaxPool3DWithIndicesBackward0",
        "AvgPool2DBackward0",
        "AvgPool3DBackward0",
        "AdaptiveAvgPool2DBackward0",
        "AdaptiveAvgPool3DBackward0",
        "AdaptiveMaxPool2DBackward0",
        "AdaptiveMaxPool3DBackward0",
        "UpsampleNearest1DBackward0",
        "UpsampleNearest2DBackward0",
        "UpsampleNearest3DBackward0",
        "UpsampleBilinear2DBackward0",
    }
)
#: Reductions homogeneous of degree 1 (sum, mean, max over some dimensions).
_REDUCTIONS = frozenset(
    {"MeanBackward0", "MeanBackward1", "SumBackward0", "SumBackward1", "AmaxBackward0", "MaxBackward0"}
)
#: Statistics of a scale: (degree multiplier, reduces).
_STATISTICS = {
    "VarBackward0": (2, True),
    "StdBackward0": (1, True),
    "LinalgVectorNormBackward0": (1, True),
    "NormBackward1": (1, True),
    "SqrtBackward0": (Fraction(1, 2), False),
    "RsqrtBackward0": (Fraction(-1, 2), False),
    "ReciprocalBackward0": (-1, False),
}
_BATCH_NORMS = frozenset({"NativeBatchNormBackward0", "CudnnBatchNormBackward0", "MiopenBatchNormBackward0"})
#: Operations after which channel c of the tensor is still output channel c of the layer.
_CHANNEL_KEEPING = (
    _ELEMENTWISE_SHIFT_COMMUTING
    | _ELEMENTWISE_SHIFT_BREAKING
    | _SPATIAL
    | {"MulBackward0", "MulBackward1", "DivBackward0", "DivBackward1"}
)
#: Most operations followed from one layer before giving up.
_MAX_STEPS = 20_000


@dataclass(eq=False)
class _Call:
    """One forward call of a recorded module."""

    name: str
    module: nn.Module
    input: Node | None
    output: Node | None
    training: bool
    shape: tuple[int, ...] = ()
    #: the node (and output number) of the weight this call consumed, when something computed it from the
    #: stored tensor (a parametrization, a pruning or spectral-norm pre-hook); ``None`` for a plain parameter
    weight: tuple[Node, int] | None = None
    _interior: set[Node] | None = None

    def interior(self) -> set[Node]:
        """The nodes this call created: everything reachable from its output before its input."""
        if self._interior is None:
            inside: set[Node] = set()
            stack = [self.output] if self.output is not None else []
            while stack:
                node = stack.pop()
                if node in inside or node is self.input or hasattr(node, "variable"):
                    continue
                inside.add(node)
                stack.extend(child for child, _ in node.next_functions if child is not None)
            self._interior = inside
        return self._interior


class DataflowRecorder:
    """Records the module calls of ``model`` while active (a context manager): the layers to analyse, and
    every other module, which names the normalizations found inside them.

    ``layers``: only these layers, e.g. those not analyzed yet; default all. The other modules are hooked
    once one of them has been called (only what follows a layer can normalize it): until then, a forward
    pass that calls none of them runs no recording code at all. A layer whose weight a parametrization
    computes also has that parametrization hooked, to note the node of the weight it returns: the weight is
    never read here (reading it would run the parametrization again).
    """

    def __init__(self, model: nn.Module, layers: Collection[nn.Module] | None = None) -> None:
        self.model = model
        self.layers = None if layers is None else set(layers)
        self.calls: list[_Call] = []
        self._handles: list[Any] = []
        self._norms_hooked = False
        self._computed: dict[nn.Module, tuple[Node, int]] = {}  # layer → its parametrized weight's node

    def __enter__(self) -> DataflowRecorder:
        for name, module in named_modules(self.model):
            if isinstance(module, LAYERS) and (self.layers is None or module in self.layers):
                self._handles.append(module.register_forward_hook(self._hook(name)))
                if parametrize.is_parametrized(module, "weight"):
                    chain = module.parametrizations["weight"]
                    self._handles.append(chain.register_forward_hook(self._computed_hook(module)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._norms_hooked = False

    def _hook_norms(self) -> None:
        """Hook every module but the layers: what computes a normalization is named after it."""
        self._norms_hooked = True
        for name, module in named_modules(self.model):
            if not isinstance(module, LAYERS):
                self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            first = args[0] if args and isinstance(args[0], Tensor) else None
            if isinstance(output, Tensor):
                grad_fn = first.grad_fn if first is not None else None
                weight = None
                if isinstance(module, LAYERS):  # the node of a computed weight, noted by a hook, else none
                    weight = self._computed.pop(module, None) or computed_node(module)
                call = _Call(name, module, grad_fn, output.grad_fn, module.training, tuple(output.shape), weight)
                self.calls.append(call)
                if not self._norms_hooked and self._handles:
                    self._hook_norms()

        return record

    def _computed_hook(self, layer: nn.Module) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def record(chain: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if isinstance(output, Tensor) and output.grad_fn is not None:
                self._computed[layer] = (output.grad_fn, output.output_nr)

        return record


@dataclass
class Candidates:
    """What :func:`find_candidates` found: unverified groups, and why other layers were left out."""

    groups: list[InvariantGroups] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)


class _Graph:
    """The autograd graph reachable from some roots, with each node's consumers."""

    def __init__(self, roots: Sequence[Node]) -> None:
        self.roots = set(roots)
        self.nodes, self.consumers, self.leaf = graph_below(roots)


def find_candidates(
    calls: Sequence[_Call], roots: Sequence[Tensor], model: nn.Module, exclude: Collection[nn.Module] = ()
) -> Candidates:
    """Layers whose output reaches the loss only through normalizations that cancel its scale (§1 table).

    Args:
        calls: what a :class:`DataflowRecorder` saw during the forward pass that built ``roots``.
        roots: the loss, or the model's outputs.
        model: the model, for parameter names.
        exclude: layers found another way (weight normalization), to leave alone.
    """
    graph = _Graph([r.grad_fn for r in roots if r.grad_fn is not None])
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


class _NormNamer:
    """The innermost recorded module call that computed a given node: the name of a normalization."""

    def __init__(self, calls: Sequence[_Call]) -> None:
        self.calls = [c for c in calls if c.output is not None]

    def __call__(self, node: Node) -> _Call | None:
        seq = node._sequence_nr()
        best: _Call | None = None
        for call in self.calls:
            if not _first(call) < seq <= _last(call):
                continue
            if best is not None and _last(call) - _first(call) >= _last(best) - _first(best):
                continue  # not inside the best one found so far
            if node in call.interior():
                best = call
        return best


def _first(call: _Call) -> int:
    """Sequence numbers: the nodes a call created come after its input's node, up to its output's."""
    return call.input._sequence_nr() if call.input is not None else -1


def _last(call: _Call) -> int:
    assert call.output is not None
    return call.output._sequence_nr()


@dataclass
class _Value:
    """How one tensor of the forward pass scales with the layer: by ``ρ[c] ** degree`` entry by entry, c the
    channel in ``ids`` (shaped like the tensor; -1 where an entry does not depend on the layer)."""

    degree: Fraction
    ids: Tensor
    statistic: bool = False  # a norm or variance: adding eps to it is the normalization's own approximation
    shift_free: bool = True  # a per-channel shift of the layer's output would still be a per-channel shift
    channels_kept: bool = True  # no operation on the way moved or mixed channels


@dataclass
class _Norm:
    """A normalization reached: the node that cancelled the scale, and what it says about the bias."""

    node: Node
    cancels_shift: bool
    fused_channel_norm: bool
    channels_kept: bool


class _Broken(Exception):
    """The layer's scale reaches the loss: the message says where."""


class _Ties:
    """Union-find over the layer's output channels: channels that must scale together."""

    def __init__(self, channels: int) -> None:
        self.parent = list(range(channels))

    def find(self, c: int) -> int:
        while self.parent[c] != c:
            self.parent[c] = self.parent[self.parent[c]]
            c = self.parent[c]
        return c

    def tie(self, ids: Tensor) -> None:
        """Tie together all the channels in each row of ``ids`` ``(P, R)``; -1 entries are ignored."""
        high = ids.amax(1)
        low = torch.where(ids >= 0, ids, high[:, None]).amin(1)
        several = low != high
        if not bool(several.any()):
            return
        ids, high = ids[several], high[several]
        pairs = torch.stack([high[:, None].expand_as(ids), ids], -1).reshape(-1, 2)
        for a, b in pairs[pairs[:, 1] >= 0].unique(dim=0).tolist():
            a, b = self.find(a), self.find(b)
            if a != b:
                self.parent[b] = a


def _layer_groups(
    name: str,
    layer: nn.Module,
    calls: Sequence[_Call],
    graph: _Graph,
    namer: _NormNamer,
    names: dict[Tensor, str],
) -> InvariantGroups | str:
    """The groups of one layer, or why it has none.

    The groups hold the tensor the optimizer steps. When something computes the weight from it (a
    parametrization, pruning, the older spectral norm: :mod:`lightning_sphere.parametrized`, docs/theory.md
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
    channels = layer.out_channels if isinstance(layer, _ConvNd) else layer.out_features
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


def _scale_free(name: str, weight: Tensor, stored: Stored, names: dict[Tensor, str]) -> InvariantGroups:
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
    weight: Tensor,
    calls: Sequence[_Call],
    graph: _Graph,
    namer: _NormNamer,
    names: dict[Tensor, str],
    standardized: tuple[_Ties, list[_Norm]] | None,
) -> InvariantGroups | str:
    """The groups the layer's output (or its standardized weight) decides, on ``weight``, or why it has none."""
    transposed = isinstance(layer, _ConvTransposeNd)
    channels = layer.out_channels if isinstance(layer, _ConvNd) else layer.out_features
    bias_stored = stored_weight(layer, "bias")
    bias = bias_stored.params[0] if bias_stored is not None and bias_stored.computed_by is None else None
    if standardized is not None:
        ties, norms = standardized
        with_bias = False
    else:
        ties = _Ties(channels)
        norms, broken, reasons = [], set(), []
        for call in calls:
            dim = 1 if isinstance(layer, _ConvNd) else len(call.shape) - 1
            if not call.shape or call.shape[dim] != channels:
                return "its output does not hold its channels where expected"
            walk = _Walk(graph, ties, namer)
            norms += walk.run(call.output, _channel_ids(call.shape, dim, channels))
            broken |= walk.broken
            reasons.append(walk.reason)
        if not norms:
            return next((r for r in reasons if r), "output is not normalized")
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
    elif transposed:
        # weight is (C_in, C_out / groups, *k): output channel (group, j) once dim 0 is split.
        split = layer.groups
        pieces = [ParamSlice(names[weight], weight, (0, 2) if split > 1 else (1,), split)]
    else:
        pieces = [ParamSlice(names[weight], weight)]
    if with_bias:
        pieces.append(ParamSlice(names[bias], bias, channels=kept))
    norm_call = namer(norms[0].node)
    norm_modules = {id(namer(n.node).module) if namer(n.node) else None for n in norms}
    return InvariantGroups(
        module_name=name,
        slices=tuple(pieces),
        num_groups=num_groups,
        norm_name=norm_call.name if norm_call else name,
        norm_type=type(norm_call.module).__name__ if norm_call else type(layer).__name__,
        granularity="channel" if per_group == 1 else "layer" if num_groups == 1 else f"{per_group} channels",
        channels_aligned=per_group == 1
        and standardized is None
        and kept is None
        and len(norm_modules) == 1
        and norm_call is not None
        and isinstance(norm_call.module, CHANNEL_NORMS)
        and all(n.fused_channel_norm and n.channels_kept for n in norms),
    )


def _channel_ids(shape: Sequence[int], dim: int, channels: int) -> Tensor:
    view = [1] * len(shape)
    view[dim] = channels
    return torch.arange(channels, dtype=torch.int32).view(view).expand(*shape)


def _group_size(ties: _Ties, channels: int, start: int = 0, stop: int | None = None) -> int:
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


def _kept_range(ties: _Ties, channels: int, broken: set[int]) -> tuple[int, int] | None:
    """The channels whose scale never reaches the loss, when they are one run ``(start, stop)`` of at least
    two channels not tied to a broken one (the q and k rows of a fused qkv projection); else ``None``."""
    lost = {ties.find(c) for c in broken}
    fine = [c for c in range(channels) if ties.find(c) not in lost]
    if len(fine) < 2 or fine[-1] - fine[0] + 1 != len(fine):
        return None
    return fine[0], fine[-1] + 1


def _standardized(
    weight: Tensor, calls: Sequence[_Call], graph: _Graph, channels: int, transposed: bool
) -> tuple[_Ties, list[_Norm]] | None:
    """Ties and normalizations when the layer's weight (``weight``, the tensor stored and stepped) is normalized
    per output channel before its use (weight standardization, in the layer's forward or in a
    parametrization), so that the layer is invariant whatever follows; else ``None``."""
    leaf = graph.leaf.get(weight)
    if leaf is None:
        return None
    inside = set().union(*(c.interior() for c in calls))
    ties = _Ties(channels)
    walk = _Walk(graph, ties, lambda node: None, inside=inside)
    shape = tuple(weight.shape)
    norms = walk.run(leaf, _channel_ids(shape, 1 if transposed else 0, shape[1 if transposed else 0]))
    return (ties, norms) if norms and not walk.broken else None


class _Walk:
    """Follows how a layer's scale propagates forward from one node, in creation order."""

    def __init__(
        self,
        graph: _Graph,
        ties: _Ties,
        namer: Callable[[Node], _Call | None],
        inside: set[Node] | None = None,
    ) -> None:
        self.graph, self.ties, self.namer, self.inside = graph, ties, namer, inside
        self.values: dict[tuple[Node, int], _Value] = {}
        self.norms: list[_Norm] = []
        self.start: Node | None = None
        self.broken: set[int] = set()
        self.reason = ""

    def run(self, start: Node, ids: Tensor) -> list[_Norm]:
        """Follow the layer's channels from ``start`` (whose value has channel ``ids``); the channels whose
        scale reaches the loss end up in :attr:`broken`, the first reason in :attr:`reason`."""
        self.start = start
        self.values[(start, 0)] = _Value(Fraction(1), ids)
        queue: list[tuple[int, int, Node]] = []
        queued: set[Node] = set()
        self._push(start, queue, queued)
        for _ in range(_MAX_STEPS):
            if not queue:
                return self.norms
            node = heapq.heappop(queue)[2]
            try:
                outputs = self._step(node)
            except _Broken as broken:
                self._lose([v for v in self._inputs(node) if v is not None], str(broken))
                continue
            except Exception:  # an operation this walk misreads must cost the layer, never the training run
                op = node.name().removesuffix("Backward0")
                self._lose([v for v in self._inputs(node) if v is not None], f"output reaches {op}, not followed")
                continue
            for nr, value in enumerate(outputs):
                if value is None or value.degree == 0 or bool((_compact(value.ids) < 0).all()):
                    continue  # no longer scales with the layer
                self.values[(node, nr)] = value
                users = self.graph.consumers.get(node, [])
                if node in self.graph.roots or (self.inside is not None and not set(users) <= self.inside):
                    self._lose([value], "output is not normalized")
                else:
                    self._push(node, queue, queued)
        self._lose(list(self.values.values()), "output is not normalized within the operations followed")
        return self.norms

    def _lose(self, values: Sequence[_Value], reason: str) -> None:
        """The channels of ``values`` reach the loss unnormalized."""
        for value in values:
            channels = _compact(value.ids).unique()
            self.broken.update(channels[channels >= 0].tolist())
        self.reason = self.reason or reason

    def _push(self, node: Node, queue: list[tuple[int, int, Node]], queued: set[Node]) -> None:
        users = self.graph.consumers.get(node, [])
        for user in users:
            if user not in queued:
                queued.add(user)
                heapq.heappush(queue, (user._sequence_nr(), id(user), user))

    def _inputs(self, node: Node) -> list[_Value | None]:
        return [self.values.get((child, nr)) if child is not None else None for child, nr in node.next_functions]

    def _shape(self, node: Node, nr: int = 0) -> tuple[int, ...]:
        return tuple(node._input_metadata[nr].shape)

    def _break(self, node: Node, inputs: list[_Value | None], why: str = "") -> _Broken:
        op = node.name().removesuffix("Backward0").removesuffix("Backward1")
        derived = any(
            child is not None and (child, nr) not in self.values and self._depends(child)
            for child, nr in node.next_functions
        )
        if derived and op in ("Add", "Sub", "Cat"):
            return _Broken("output is used besides the normalization")
        return _Broken(f"output reaches {op}{why} before any normalization")

    def _depends(self, node: Node) -> bool:
        """Whether ``node`` was computed from the start of the walk (one of its normalized values)."""
        if self.start is None or hasattr(self.start, "variable"):
            return False
        low, seen, stack = self.start._sequence_nr(), set(), [node]
        while stack:
            n = stack.pop()
            if n is self.start:
                return True
            if n in seen or hasattr(n, "variable") or n._sequence_nr() < low:
                continue
            seen.add(n)
            stack.extend(child for child, _ in n.next_functions if child is not None)
        return False

    def _step(self, node: Node) -> list[_Value | None]:
        """The values of the node's outputs, from those of its inputs."""
        inputs = self._inputs(node)
        scaled = [i for i, v in enumerate(inputs) if v is not None]
        op = node.name()
        if not scaled:
            return []
        first = inputs[scaled[0]]
        assert first is not None
        if op in _ELEMENTWISE_SHIFT_COMMUTING or op in _ELEMENTWISE_SHIFT_BREAKING:
            if len(scaled) != 1 or scaled[0] != 0:
                raise self._break(node, inputs)
            return [self._moved(first, first.ids, op)]
        if op == "PreluKernelBackward0":
            if scaled != [0]:
                raise self._break(node, inputs)
            return [self._moved(first, first.ids, op)]
        if op in _RESHAPES or op == "ExpandBackward0":
            out = self._shape(node)
            ids = first.ids.expand(out) if op == "ExpandBackward0" else _reshape(first.ids, out)
            return [self._moved(first, ids, op, keeps=op.startswith(("Squeeze", "Unsqueeze", "Expand")))]
        if op == "PermuteBackward0":
            return [self._moved(first, first.ids.permute([_signed(d) for d in node._saved_dims]), op, keeps=False)]
        if op == "TransposeBackward0":
            ids = first.ids.transpose(_signed(node._saved_dim0), _signed(node._saved_dim1))
            return [self._moved(first, ids, op, keeps=False)]
        if op == "TBackward0":
            return [self._moved(first, first.ids.t(), op, keeps=False)]
        if op == "SliceBackward0":
            index = [slice(None)] * first.ids.dim()
            start, end = _signed(node._saved_start), _signed(node._saved_end)
            index[_signed(node._saved_dim)] = slice(start, end, node._saved_step)
            return [self._moved(first, first.ids[tuple(index)], op, keeps=False)]
        if op == "SelectBackward0":
            ids = first.ids.select(_signed(node._saved_dim), _signed(node._saved_index))
            return [self._moved(first, ids, op, keeps=False)]
        if op in ("SplitBackward0", "SplitWithSizesBackward0", "UnbindBackward0"):
            dim = _signed(node._saved_dim)
            if op == "UnbindBackward0":
                parts = first.ids.unbind(dim)
            else:
                sizes = node._saved_split_size if op == "SplitBackward0" else list(node._saved_split_sizes)
                parts = first.ids.split(sizes, dim)
            return [self._moved(first, p, op, keeps=False) for p in parts]
        if op == "CatBackward0":
            return [self._cat(node, inputs)]
        if op in _SPATIAL:
            if scaled != [0]:
                raise self._break(node, inputs)
            flat = _compact(first.ids).flatten(2)
            if not bool((flat == flat[:, :, :1]).all()):
                raise self._break(node, inputs, " (mixing channels)")
            ids = flat[:, :, :1].reshape(*flat.shape[:2], *[1] * (first.ids.dim() - 2))
            return [self._moved(first, ids.expand(self._shape(node)), op)]
        if op in _REDUCTIONS:
            ids = self._reduce(node, first.ids, self._dims(node, first.ids.dim()))
            return [self._moved(first, _reshape(ids, self._shape(node)), op, keeps=False)]
        if op == "ClampMinBackward0" and scaled == [0]:
            if first.statistic:  # F.normalize's clamp of the norm at eps: the normalization's own approximation
                return [self._moved(first, first.ids, op)]
            if node._saved_min == 0:  # relu
                return [self._moved(first, first.ids, "ReluBackward0")]
            raise self._break(node, inputs)
        if op in _STATISTICS:
            if scaled != [0]:
                raise self._break(node, inputs)
            factor, reduces = _STATISTICS[op]
            ids = first.ids
            if reduces:
                ids = _reshape(self._reduce(node, ids, self._dims(node, ids.dim())), self._shape(node))
            return [_Value(first.degree * factor, ids, statistic=True, shift_free=False, channels_kept=False)]
        if op in ("VarMeanBackward0", "StdMeanBackward0"):
            ids = _reshape(self._reduce(node, first.ids, self._dims(node, first.ids.dim())), self._shape(node))
            factor = 2 if op.startswith("Var") else 1
            return [
                _Value(first.degree * factor, ids, statistic=True, shift_free=False, channels_kept=False),
                _Value(first.degree, ids, shift_free=False, channels_kept=False),
            ]
        if op == "PowBackward0":
            exponent = Fraction(node._saved_exponent).limit_denominator(1000)
            return [_Value(first.degree * exponent, first.ids, statistic=True, shift_free=False, channels_kept=False)]
        if op in ("AddBackward0", "SubBackward0", "AddBackward1", "SubBackward1", "RsubBackward1"):
            return [self._add(node, inputs)]
        if op in ("MulBackward0", "MulBackward1", "DivBackward0", "DivBackward1"):
            return [self._product(node, inputs, divide=op.startswith("Div"))]
        if op in ("MmBackward0", "BmmBackward0"):
            return [self._matmul(node, inputs)]
        if op == "ConvolutionBackward0":
            return [self._conv(node, inputs)]
        if op.startswith("ScaledDotProduct"):
            if scaled != [2]:
                raise self._break(node, inputs, " as a query or key")
            ids = self._reduce(node, first.ids, [first.ids.dim() - 2])
            shape = self._shape(node)
            if ids.dim() >= 3 and ids.shape[-3] < shape[-3] and shape[-3] % ids.shape[-3] == 0:
                # grouped-query attention (enable_gqa): each key/value head serves consecutive query heads
                ids = ids.repeat_interleave(shape[-3] // ids.shape[-3], dim=-3)
            out = _Value(first.degree, ids.expand(shape), shift_free=False, channels_kept=False)
            return [out]
        if op == "NativeLayerNormBackward0":
            if scaled != [0]:
                raise self._break(node, inputs)
            n = len(node._saved_normalized_shape)
            return self._normalize(node, first, list(range(first.ids.dim() - n, first.ids.dim())), fused=False)
        if op == "NativeGroupNormBackward0":
            if scaled != [0]:
                raise self._break(node, inputs)
            grouped = _Value(first.degree, _reshape(first.ids, (first.ids.shape[0], node._saved_group, -1)))
            grouped.shift_free, grouped.channels_kept = first.shift_free, False
            return self._normalize(node, grouped, [2], fused=False)
        if op in _BATCH_NORMS:
            if scaled != [0]:
                raise self._break(node, inputs)
            if not self._batch_statistics(node):
                call = self.namer(node)
                what = f"{call.name} ({type(call.module).__name__})" if call else "a batch norm"
                raise _Broken(f"{what} uses running statistics (eval mode)")
            dims = [d for d in range(first.ids.dim()) if d != 1]
            return self._normalize(node, first, dims, fused=True)
        raise self._break(node, inputs)

    def _batch_statistics(self, node: Node) -> bool:
        """Whether a batch norm node normalized with the statistics of its input. The native node says so;
        cuDNN's does not save it: then its module's mode, or the batch statistics it saved, tell."""
        training = getattr(node, "_saved_training", None)
        if training is not None:
            return bool(training)
        call = self.namer(node)
        if call is not None and isinstance(call.module, _BatchNorm):
            return call.training or not call.module.track_running_stats
        saved = getattr(node, "_saved_result1", None)
        return saved is not None and saved.numel() > 0

    def _moved(self, value: _Value, ids: Tensor, op: str, keeps: bool = True) -> _Value:
        return _Value(
            value.degree,
            ids,
            statistic=value.statistic,
            shift_free=value.shift_free and op not in _ELEMENTWISE_SHIFT_BREAKING and op != "PreluKernelBackward0",
            channels_kept=value.channels_kept and (keeps or op in _CHANNEL_KEEPING),
        )

    def _dims(self, node: Node, ndim: int) -> list[int]:
        dims = getattr(node, "_saved_dim", None)
        if dims is None or (isinstance(dims, tuple | list) and len(dims) == 0):
            return list(range(ndim))
        if isinstance(dims, int):
            dims = [dims]
        return sorted({_signed(d) % ndim for d in dims}) if ndim else []

    def _reduce(self, node: Node, ids: Tensor, dims: Sequence[int]) -> Tensor:
        """Tie the channels met along ``dims``; the result keeps those dims with size 1. An entry that does
        not depend on the layer summed with ones that do breaks the scaling."""
        keep = [d for d in range(ids.dim()) if d not in dims]
        compact = _compact(ids)
        rows = _rows(compact, keep)
        if bool(((rows < 0).any(1) & (rows >= 0).any(1)).any()):
            raise self._break(node, [], " (with entries that do not scale)")
        self.ties.tie(rows)
        reduced = rows.amax(1).reshape([compact.shape[d] if d in keep else 1 for d in range(ids.dim())])
        return reduced.expand([ids.shape[d] if d in keep else 1 for d in range(ids.dim())])

    def _merge(self, a: Tensor, b: Tensor) -> Tensor:
        """Element-wise: entries of ``a`` and ``b`` that both scale scale together."""
        shape = torch.broadcast_tensors(a, b)[0].shape  # torch.broadcast_shapes imports the fx machinery
        a, b = torch.broadcast_tensors(_compact(a), _compact(b))
        both = (a >= 0) & (b >= 0)
        if bool(both.any()):
            self.ties.tie(torch.stack([a[both], b[both]], 1))
        return torch.where(a >= 0, a, b).expand(shape)

    def _add(self, node: Node, inputs: list[_Value | None]) -> _Value:
        out = self._shape(node)
        present = [v for v in inputs if v is not None]
        constant = [child for child, _ in node.next_functions if child is None] or len(node.next_functions) == 1
        if len(present) == 2 and present[0].degree == present[1].degree:
            a, b = present
            a_ids, b_ids = torch.broadcast_tensors(_compact(a.ids.expand(out)), _compact(b.ids.expand(out)))
            if bool(((a_ids < 0) != (b_ids < 0)).any()):
                raise self._break(node, inputs, " (with entries that do not scale)")
            return _Value(
                a.degree,
                self._merge(a.ids, b.ids).expand(out),
                statistic=a.statistic and b.statistic,
                shift_free=a.shift_free and b.shift_free,
                channels_kept=a.channels_kept and b.channels_kept,
            )
        if len(present) == 1 and constant and present[0].statistic:
            return self._moved(present[0], present[0].ids.expand(out), node.name())  # + eps
        raise self._break(node, inputs)

    def _product(self, node: Node, inputs: list[_Value | None], divide: bool) -> _Value | None:
        out = self._shape(node)
        a = inputs[0]
        b = inputs[1] if len(inputs) > 1 else None
        degree = (a.degree if a else 0) + (-(b.degree) if divide and b else (b.degree if b else 0))
        base = a or b
        assert base is not None
        ids = self._merge(a.ids, b.ids) if a is not None and b is not None else base.ids
        if degree == 0:
            self.norms.append(_Norm(node, cancels_shift=False, fused_channel_norm=False, channels_kept=False))
            return None
        return _Value(
            Fraction(degree),
            ids.expand(out),
            statistic=all(v.statistic for v in (a, b) if v is not None),
            shift_free=False,
            channels_kept=(a is None or a.channels_kept) and (b is None or b.channels_kept),
        )

    def _normalize(self, node: Node, value: _Value, dims: list[int], fused: bool) -> list[_Value | None]:
        """A fused normalization over ``dims`` of its input: the channels in each normalized set tie."""
        ids = value.ids
        rows = _rows(_compact(ids), [d for d in range(ids.dim()) if d not in dims])
        if bool(((rows < 0).any(1) & (rows >= 0).any(1)).any()):
            raise self._break(node, [], " (with entries that do not scale)")
        single = bool((rows.amax(1) == rows.amin(1)).all())
        self.ties.tie(rows)
        kept = value.channels_kept
        self.norms.append(
            _Norm(node, cancels_shift=value.shift_free and single, fused_channel_norm=fused, channels_kept=kept)
        )
        return [None]

    def _matmul(self, node: Node, inputs: list[_Value | None]) -> _Value:
        a, b = inputs[0], inputs[1]
        out = self._shape(node)
        ids = None
        if a is not None:
            ids = self._reduce(node, a.ids, [a.ids.dim() - 1]).expand(out)
        if b is not None:
            other = self._reduce(node, b.ids, [b.ids.dim() - 2]).expand(out)
            ids = other if ids is None else self._merge(ids, other)
        degree = (a.degree if a else 0) + (b.degree if b else 0)
        assert ids is not None
        return _Value(Fraction(degree), ids, shift_free=False, channels_kept=False)

    def _conv(self, node: Node, inputs: list[_Value | None]) -> _Value:
        bias = node._saved_bias_sym_sizes_opt
        if bias is not None and math.prod(bias) > 0:
            raise self._break(node, inputs, " (a bias on the way)")
        x, w = inputs[0], inputs[1]
        out = self._shape(node)
        ids = None
        if x is not None:
            ids = self._reduce(node, x.ids, list(range(1, x.ids.dim()))).expand(out)
        if w is not None:
            if node._saved_transposed or node._saved_groups != 1:
                raise self._break(node, inputs)
            per = self._reduce(node, w.ids, list(range(1, w.ids.dim()))).flatten()
            other = per.view(1, -1, *[1] * (len(out) - 2)).expand(out)
            ids = other if ids is None else self._merge(ids, other)
        degree = (x.degree if x else 0) + (w.degree if w else 0)
        assert ids is not None
        return _Value(Fraction(degree), ids, shift_free=False, channels_kept=False)

    def _cat(self, node: Node, inputs: list[_Value | None]) -> _Value:
        out = self._shape(node)
        dim = _signed(node._saved_dim) % len(out)
        sizes: list[int | None] = []
        for (child, nr), value in zip(node.next_functions, inputs, strict=True):
            if value is not None:
                sizes.append(value.ids.shape[dim])
            elif child is not None:
                sizes.append(child._input_metadata[nr].shape[dim])
            else:
                sizes.append(None)
        unknown = [i for i, s in enumerate(sizes) if s is None]
        if len(unknown) > 1:
            raise self._break(node, inputs)
        if unknown:
            sizes[unknown[0]] = out[dim] - sum(s for s in sizes if s is not None)
        parts = []
        for size, value in zip(sizes, inputs, strict=True):
            shape = list(out)
            shape[dim] = size
            parts.append(
                value.ids.expand(shape) if value is not None else torch.tensor(-1, dtype=torch.int32).expand(shape)
            )
        # dimensions broadcast in every part stay broadcast: concatenate one slice of them
        flat = [d for d in range(len(out)) if d != dim and all(p.stride(d) == 0 for p in parts)]
        index = tuple(slice(0, 1) if d in flat else slice(None) for d in range(len(out)))
        joined = torch.cat([p[index] for p in parts], dim).expand(out)
        present = [v for v in inputs if v is not None]
        degrees = {v.degree for v in present}
        if len(degrees) > 1:
            raise self._break(node, inputs)
        return _Value(
            degrees.pop(),
            joined,
            statistic=all(v.statistic for v in present),
            shift_free=all(v.shift_free for v in present),
            channels_kept=False,
        )


def _signed(dim: int) -> int:
    """A saved dimension as Python sees it: some nodes hand ``-1`` back as an unsigned 64-bit integer."""
    return dim - 2**64 if dim >= 2**63 else dim


def _compact(ids: Tensor) -> Tensor:
    """``ids`` without its broadcast dimensions (stride 0: every entry along them is the same), kept with
    size 1: what every reduction and comparison needs, at a fraction of the size."""
    return ids[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in ids.stride())]


def _reshape(ids: Tensor, shape: Sequence[int]) -> Tensor:
    """``ids.reshape(shape)``, without materializing leading broadcast dimensions that the reshape keeps."""
    lead = 0
    while lead < min(ids.dim(), len(shape)) and ids.shape[lead] == shape[lead] and ids.stride(lead) == 0:
        lead += 1
    if lead == 0:
        return ids.reshape(shape)
    inner = ids[(slice(0, 1),) * lead].reshape(*[1] * lead, *shape[lead:])
    return inner.expand(*shape)


def _rows(ids: Tensor, keep: Sequence[int]) -> Tensor:
    """``ids`` as one row per index of the ``keep`` dimensions, the other dimensions along the row."""
    rest = [d for d in range(ids.dim()) if d not in keep]
    return ids.permute(*keep, *rest).reshape(math.prod(ids.shape[d] for d in keep), -1)


def _check_params(
    layer: nn.Module, weight: Tensor, calls: Sequence[_Call], graph: _Graph, names: dict[Tensor, str], with_bias: bool
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
    for p in (weight, bias):
        if p is not None and any(user not in inside for user in graph.consumers.get(graph.leaf.get(p), ())):
            return f"{names[p]} is also used outside {calls[0].name}"
    return None
