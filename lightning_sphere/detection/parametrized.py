"""Layers whose weight is computed from another tensor: which tensor the optimizer steps, and how the computed
weight scales with it (docs/theory.md §1.1).

``torch.nn.utils.parametrize`` (``spectral_norm``, ``orthogonal``, a mask, any user map) computes ``weight`` from
``parametrizations.weight.original`` whenever it is read; ``torch.nn.utils.prune`` and the older
``torch.nn.utils.spectral_norm`` compute it from ``weight_orig`` in a forward pre-hook. The optimizer steps the
stored tensor, so that is what a group holds. Nothing here reads ``module.weight``: reading a parametrized weight
runs the parametrization (spectral norm's power iteration advances its ``_u``/``_v`` buffers), which would change
training. :func:`stored_weight` looks at the stored tensors only, and :func:`read_scaling` reads what the
parametrization computed off the autograd graph of the real forward pass.

What decides whether the stored tensor's groups are those of a plain weight (a layer followed by a
normalization) is how the computed weight W scales when the output channels of the stored tensor V are scaled by
positive factors ρ_c: if each channel of W scales by ρ_c^k times a factor common to all channels (a mask:
W = V ⊙ M; spectral normalization: W = V/σ(V), Miyato et al., arXiv:1802.05957), the layer's output channels scale
by positive factors and a normalization after the layer cancels them as it cancels a plain weight's. If W does
not change at all when V is scaled as a whole (W = V/σ(V) again: σ(ρV) = ρσ(V)), V is invariant whatever follows,
as a ``weight_norm(dim=None)`` direction is.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor, nn
from torch.autograd.graph import Node
from torch.nn.utils import parametrize
from torch.nn.utils.weight_norm import WeightNorm

from lightning_sphere.detection.nodes import saved, signed


@dataclass(frozen=True, eq=False)
class Stored:
    """Where a layer keeps one of its tensors.

    Attributes:
        params: what the optimizer steps: the parameter itself, or what the tensor is computed from (one
            tensor, except for a parametrization whose ``right_inverse`` returns several).
        computed_by: ``None`` for a plain parameter; else what computes the tensor from ``params``, for messages:
            "parametrization `_SpectralNorm`", "forward pre-hook `L1Unstructured`".
        module: the name of the module that computes it, below the layer (``parametrizations.weight``); ``""``
            for a hook, which is no module.
        kind: the class name(s) of what computes it (``"_SpectralNorm"``, ``"SpectralNorm"``).
    """

    params: tuple[nn.Parameter, ...]
    computed_by: str | None = None
    module: str = ""
    kind: str = ""


def stored_weight(layer: nn.Module, tensor: str = "weight") -> Stored | None:
    """How ``layer`` stores ``tensor``, read without computing it; ``None`` when no parameter is behind it (a
    plain tensor attribute, or a weight normalization, whose direction and norm ``layouts.weight_norm_groups``
    handles).

    The parametrizations of ``torch.nn.utils.parametrize`` keep ``parametrizations.<tensor>.original`` (or
    ``original0``, ``original1``, … when ``right_inverse`` returns several tensors); ``torch.nn.utils.prune`` and
    ``torch.nn.utils.spectral_norm`` keep ``<tensor>_orig`` and compute the tensor in a forward pre-hook.
    """
    chain = parametrizations(layer).get(tensor)
    if chain is not None:
        originals = [p for name, p in chain._parameters.items() if name.startswith("original") and p is not None]
        if not originals:
            return None  # parametrized buffers: nothing trainable
        kind = " → ".join(type(p).__name__ for p in chain)
        return Stored(tuple(originals), f"parametrization `{kind}`", f"parametrizations.{tensor}", kind)
    own = layer._parameters.get(tensor)
    if own is not None:
        return Stored((own,))
    original = layer._parameters.get(f"{tensor}_orig")
    for hook in layer._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm):
            continue
        if original is not None and tensor in (getattr(hook, "_tensor_name", None), getattr(hook, "name", None)):
            kind = type(hook).__name__
            return Stored((original,), f"forward pre-hook `{kind}`", "", kind)
    return None


def parametrizations(module: nn.Module) -> dict[str, parametrize.ParametrizationList]:
    """The chains ``torch.nn.utils.parametrize`` keeps on ``module`` (``module.parametrizations``), by tensor name;
    empty when it parametrizes none of its tensors."""
    chains = getattr(module, "parametrizations", None)
    if not isinstance(chains, nn.ModuleDict):  # as parametrize.is_parametrized tells
        return {}
    return {name: chain for name, chain in chains.items() if isinstance(chain, parametrize.ParametrizationList)}


def computed_node(layer: nn.Module, tensor: str = "weight") -> tuple[Node, int] | None:
    """The autograd node (and output number) of ``tensor`` as a forward pre-hook last computed it (prune, the
    older spectral norm), read from the attribute the hook set, without computing anything; ``None`` for a
    parameter, or a tensor with no graph."""
    if tensor in layer._parameters:
        return None
    value = layer.__dict__.get(tensor)
    if isinstance(value, Tensor) and value.grad_fn is not None:
        return value.grad_fn, value.output_nr
    return None


@dataclass(frozen=True)
class Scaling:
    """How a computed weight W scales with the stored tensor V (:func:`read_scaling`).

    Attributes:
        channels: scaling V's output channels by positive factors ρ_c scales W's channel c by ρ_c^k times a
            factor common to all channels (k fixed).
        exact: and with k = 1 and no common factor: W's channel c scales by ρ_c exactly, as a bias scaled along
            with it does (a mask).
        scale_free: W does not change when the whole of V is scaled by one ρ > 0.
        mixed_at: the operation where the channels of V stopped scaling separately on the way to W, if they did
            (``"Tril"``), for messages.
    """

    channels: bool
    exact: bool
    scale_free: bool
    mixed_at: str = ""


def read_scaling(computed: tuple[Node, int], stored: Tensor, channel_ids: Tensor) -> Scaling:
    """How the weight computed at node ``computed`` scales with ``stored``, read off the autograd graph between
    them (the parametrization's own operations).

    Args:
        computed: the node (and output number) that produced the weight the layer consumed.
        stored: the tensor the optimizer steps, a leaf of that graph.
        channel_ids: ``stored``'s shape: the layer's output channel of every entry.

    Each value on the way from ``stored`` is either *by channel* (each entry scales with one channel of
    ``stored``, recorded in ids, by ρ_c^k times a factor shared by all of its entries), *common* (every entry
    scales by one factor: a norm, σ, any single number computed from ``stored``), or *mixed*. A single number is
    common whatever computed it; products and quotients of by-channel and common values stay by channel.
    Alongside, the degree under one common ρ: ρ^degree, ``None`` when not homogeneous. Operations not listed
    mix. The result is exact for the operations read; the gradient test still verifies every candidate.
    """
    reader = _Reader(computed[0])
    start = reader.leaf(stored)
    if start is None:
        return Scaling(False, False, False)
    value = reader.run(start, channel_ids, computed)
    if value is None:
        return Scaling(False, False, False)
    same = (
        value.ids is not None
        and value.row_degree is not None
        and value.ids.shape == channel_ids.shape
        and torch.equal(value.ids, channel_ids)
    )
    mixed_at = "" if same else value.mixed_at or "a reordering of the channels"
    return Scaling(same, same and value.pure and value.row_degree == 1, value.degree == 0, mixed_at)


@dataclass
class _Value:
    """One tensor on the way from the stored tensor to the weight (see :func:`read_scaling`)."""

    ids: Tensor | None  # by channel: the channel of every entry; None: common or mixed
    common: bool  # every entry scales by one factor (for ids None)
    degree: Fraction | None  # under one common ρ
    row_degree: Fraction | None = None  # by channel: the k of ρ_c^k
    pure: bool = True  # by channel, and no common factor multiplied in (two such values can be added)
    mixed_at: str = ""

    @property
    def by_channel(self) -> bool:
        return self.ids is not None


#: Element-wise operations positively homogeneous of degree 1 (f(ρx) = ρ f(x), ρ > 0), entry by entry.
_ELEMENTWISE = frozenset(
    {
        "AliasBackward0",
        "CloneBackward0",
        "ToCopyBackward0",
        "NegBackward0",
        "ReluBackward0",
        "LeakyReluBackward0",
        "AbsBackward0",
    }
)


_VIEWS = frozenset(
    {
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "SqueezeBackward2",
        "UnsqueezeBackward0",
        "ExpandBackward0",
    }
)


_POWERS = {"SqrtBackward0": Fraction(1, 2), "RsqrtBackward0": Fraction(-1, 2), "ReciprocalBackward0": Fraction(-1)}


#: Reductions and contractions homogeneous of degree 1 in each input that depends on the stored tensor (2:
#: a variance); their result mixes channels (a single number is common).
_CONTRACTIONS = {
    "SumBackward0": 1,
    "SumBackward1": 1,
    "MeanBackward0": 1,
    "MeanBackward1": 1,
    "MvBackward0": 1,
    "MmBackward0": 1,
    "BmmBackward0": 1,
    "DotBackward0": 1,
    "VdotBackward0": 1,
    "LinalgVectorNormBackward0": 1,
    "NormBackward1": 1,
    "AmaxBackward0": 1,
    "StdBackward0": 1,
    "VarBackward0": 2,
}


def graph_below(roots: Iterable[Node]) -> tuple[set[Node], dict[Node, list[Node]], dict[Tensor, Node]]:
    """The autograd graph reachable from ``roots``: its nodes, each node's consumers (the nodes that take its
    output in), and the ``AccumulateGrad`` node of each leaf tensor."""
    consumers: dict[Node, list[Node]] = {}
    leaves: dict[Tensor, Node] = {}
    seen: set[Node] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves[variable] = node
        for child, _ in node.next_functions:
            if child is not None:
                consumers.setdefault(child, []).append(node)
                stack.append(child)
    return seen, consumers, leaves


class _Reader:
    """Follows the stored tensor forward, in creation order, through the graph below the computed weight."""

    def __init__(self, root: Node) -> None:
        _, self.consumers, self.leaves = graph_below([root])
        self.values: dict[tuple[Node, int], _Value] = {}

    def leaf(self, tensor: Tensor) -> Node | None:
        return self.leaves.get(tensor)

    def run(self, start: Node, ids: Tensor, end: tuple[Node, int]) -> _Value | None:
        self.values[(start, 0)] = _Value(ids, False, Fraction(1), Fraction(1))
        queue: list[tuple[int, int, Node]] = []
        queued: set[Node] = set()
        self._push(start, queue, queued)
        while queue:
            node = heapq.heappop(queue)[2]
            inputs = [self.values.get((c, nr)) if c is not None else None for c, nr in node.next_functions]
            if all(v is None for v in inputs):
                continue
            for nr, value in enumerate(self._step(node, inputs)):
                self.values[(node, nr)] = value
            self._push(node, queue, queued)
        return self.values.get(end)

    def _push(self, node: Node, queue: list[tuple[int, int, Node]], queued: set[Node]) -> None:
        for user in self.consumers.get(node, []):
            if user not in queued:
                queued.add(user)
                heapq.heappush(queue, (user._sequence_nr(), id(user), user))

    def _step(self, node: Node, inputs: list[_Value | None]) -> list[_Value]:
        op = node.name()
        shapes = [tuple(m.shape) for m in node._input_metadata]
        present = [v for v in inputs if v is not None]
        first = present[0]
        try:
            if op in _ELEMENTWISE and len(present) == 1:
                return [first]
            if (op in _VIEWS or op in ("PermuteBackward0", "TransposeBackward0", "TBackward0")) and len(present) == 1:
                return [_moved(first, _view_ids(node, op, first.ids, shapes[0]))]
            if op in _POWERS or op == "PowBackward0":
                exponent = _POWERS.get(op) or Fraction(saved(node, "_saved_exponent")).limit_denominator(1000)
                if len(present) == 1 and inputs[0] is first:
                    return [_powered(first, exponent)]
            if op in ("MulBackward0", "MulBackward1", "DivBackward0", "DivBackward1"):
                return [self._product(inputs, shapes[0], divide=op.startswith("Div"), op=op)]
            if op in ("AddBackward0", "SubBackward0"):
                return [_sum(inputs, shapes[0], _label(op))]
            if op in _CONTRACTIONS:
                degree = _total(v.degree for v in present)
                degree = None if degree is None else degree * _CONTRACTIONS[op]
                return [_mixed(present, shapes[0], degree, _label(op), linear=True)]
        except (AttributeError, RuntimeError, TypeError, ValueError):  # a node laid out otherwise: it mixes
            pass
        return [_mixed(present, shape, None, _label(op)) for shape in shapes]

    def _product(self, inputs: list[_Value | None], shape: Sequence[int], divide: bool, op: str) -> _Value:
        a = inputs[0]
        b = inputs[1] if len(inputs) > 1 else None
        sign = -1 if divide else 1
        degree = _total([a.degree if a else 0, _times(b.degree, sign) if b else 0])
        present = [v for v in (a, b) if v is not None]
        if any(v.ids is None and not v.common for v in present):
            return _mixed(present, shape, degree, _label(op))
        channels = [v for v in present if v.by_channel]
        if not channels:
            return _Value(None, True, degree)
        if len(channels) == 2:  # a and b, both by channel
            by_a, by_b = channels
            ids_a, ids_b = torch.broadcast_tensors(by_a.ids, by_b.ids)
            if not torch.equal(ids_a, ids_b):
                return _mixed(present, shape, degree, _label(op))
            row = _total([by_a.row_degree, _times(by_b.row_degree, sign)])
            return _Value(ids_a.expand(shape), False, degree, row, by_a.pure and by_b.pure)
        value = channels[0]
        assert value.ids is not None  # by channel
        row = value.row_degree if value is a else _times(value.row_degree, sign)
        common = len(present) == 2  # a common factor multiplied in (a constant leaves the value pure)
        return _Value(value.ids.expand(shape), False, degree, row, value.pure and not common)


def _label(op: str) -> str:
    return op.removesuffix("Backward0").removesuffix("Backward1")


def _total(degrees: Iterable[Fraction | int | None]) -> Fraction | None:
    """The sum of degrees, ``None`` if one is unknown."""
    total = Fraction(0)
    for d in degrees:
        if d is None:
            return None
        total += d
    return total


def _times(degree: Fraction | None, factor: int) -> Fraction | None:
    return None if degree is None else degree * factor


def _moved(value: _Value, ids: Tensor | None) -> _Value:
    return _Value(ids, value.common, value.degree, value.row_degree, value.pure, value.mixed_at)


def _powered(value: _Value, exponent: Fraction) -> _Value:
    degree = None if value.degree is None else value.degree * exponent
    row = None if value.row_degree is None else value.row_degree * exponent
    return _Value(value.ids, value.common, degree, row, value.pure, value.mixed_at)


def _mixed(
    inputs: Sequence[_Value], shape: Sequence[int], degree: Fraction | None, op: str, linear: bool = False
) -> _Value:
    """A value that does not scale channel by channel: common if it is a single number (any function of the
    stored tensor that returns one number scales every channel alike) or a reduction or contraction of common
    values only (``linear``), else mixed."""
    single = int(torch.Size(shape).numel()) == 1
    common = single or (linear and all(v.common for v in inputs))
    was_by_channel = any(v.by_channel for v in inputs)
    mixed_at = next((v.mixed_at for v in inputs if v.mixed_at), "") or (op if was_by_channel else "")
    return _Value(None, common, degree, mixed_at=mixed_at)


def _sum(inputs: list[_Value | None], shape: Sequence[int], op: str) -> _Value:
    present = [v for v in inputs if v is not None]
    if len(present) == 2:
        a, b = present
        if a.by_channel and b.by_channel and a.pure and b.pure and a.row_degree == b.row_degree is not None:
            ids_a, ids_b = torch.broadcast_tensors(a.ids, b.ids)
            if torch.equal(ids_a, ids_b):
                degree = a.degree if a.degree == b.degree else None
                return _Value(ids_a.expand(shape), False, degree, a.row_degree)
    # A constant added, or terms that scale differently: not homogeneous.
    return _mixed(present, shape, None, op)


def _view_ids(node: Node, op: str, ids: Tensor | None, shape: Sequence[int]) -> Tensor | None:
    if ids is None:
        return None
    if op == "PermuteBackward0":
        return ids.permute([signed(d) for d in saved(node, "_saved_dims")])
    if op == "TransposeBackward0":
        return ids.transpose(signed(saved(node, "_saved_dim0")), signed(saved(node, "_saved_dim1")))
    if op == "TBackward0":
        return ids.t()
    if op == "ExpandBackward0":
        return ids.expand(shape)
    return ids.reshape(shape)
