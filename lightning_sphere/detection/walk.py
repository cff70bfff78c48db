"""The scaling walk: how a layer's scale propagates forward through the autograd graph, operation by operation.

An abstract interpreter over the graph, kept apart from its operator table as ``torch.fx.passes`` keeps its
graph interpreters apart from what they know of each operator: it visits the nodes downstream of the layer in
creation order, keeps each value's scaling (:class:`~lightning_sphere.detection.scaling.ScaledValue`), and asks
the table (:mod:`lightning_sphere.detection.operations`) what each node does to it. The walk itself owns what is
common to every operation: the queue, the values, the channel ties (reductions and contractions tie the channels
they sum over, :meth:`ScalingWalk.reduce`, :meth:`ScalingWalk.merge`) and where the scale breaks (reaches the
loss unnormalized, with the reason). An operation the table does not know breaks the scale: to teach the walk a
new one, add a rule to the table.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from fractions import Fraction

import torch
from torch import Tensor
from torch.autograd.graph import Node

from lightning_sphere.core.names import class_name
from lightning_sphere.detection.operations import rule_for
from lightning_sphere.detection.provenance import provenance
from lightning_sphere.detection.recorder import _Call, _Graph
from lightning_sphere.detection.scaling import (
    ChannelTies,
    NormReached,
    ScaleBroken,
    ScaledValue,
    compact,
    mixes_scaling,
    rows,
)

#: Most operations followed from one layer before giving up.
_MAX_STEPS = 20_000


class ScalingWalk:
    """Follows how a layer's scale propagates forward from one node, in creation order.

    Args:
        graph: the recorded forward pass's autograd graph.
        ties: the layer's channels tied so far (shared by the walks from each of its calls).
        namer: the recorded module call that computed a node, if any (names a normalization).
        inside: when given, the only nodes the scale may reach (a weight standardized inside its layer): a
            value used elsewhere is not normalized.
    """

    def __init__(
        self,
        graph: _Graph,
        ties: ChannelTies,
        namer: Callable[[Node], _Call | None],
        inside: set[Node] | None = None,
    ) -> None:
        self.graph, self.ties, self.namer, self.inside = graph, ties, namer, inside
        self.values: dict[tuple[Node, int], ScaledValue] = {}
        self.norms: list[NormReached] = []
        self.start: Node | None = None
        self.broken: set[int] = set()
        self.reason = ""
        #: where the layer's channels were first parted (``q, k, v = qkv.chunk(3)``): the channels in each part
        self.parts: list[set[int]] = []
        #: parameter → {entry: channel}: the entries of a bias built on the spot (``F.linear(x, w, cat(...))``)
        #: that are added to the layer's channels, and so scale with them (:meth:`add_bias`)
        self.companions: dict[Tensor, dict[int, int]] = {}

    def run(self, start: Node, ids: Tensor) -> list[NormReached]:
        """Follow the layer's channels from ``start`` (whose value has channel ``ids``); the channels whose
        scale reaches the loss end up in :attr:`broken`, the first reason in :attr:`reason`."""
        self.start = start
        self.values[(start, 0)] = ScaledValue(Fraction(1), ids)
        if start in self.graph.roots and not self.graph.consumers.get(start):  # the layer's output is the output
            self._lose([self.values[(start, 0)]], at_output(self.graph.output))
        queue: list[tuple[int, int, Node]] = []
        queued: set[Node] = set()
        self._push(start, queue, queued)
        for _ in range(_MAX_STEPS):
            if not queue:
                return self.norms
            node = heapq.heappop(queue)[2]
            try:
                outputs = self._step(node)
            except ScaleBroken as broken:
                self._lose([v for v in self._inputs(node) if v is not None], str(broken))
                continue
            except Exception:  # an operation this walk misreads must cost the layer, never the training run
                where = self.where(node)
                self._lose([v for v in self._inputs(node) if v is not None], f"output reaches {where}, not followed")
                continue
            if not self.parts and len(outputs) > 1:
                self.parts = _parts(outputs, self.ties)
            for nr, value in enumerate(outputs):
                if value is None or value.degree == 0 or bool((compact(value.ids) < 0).all()):
                    continue  # no longer scales with the layer
                self.values[(node, nr)] = value
                users = self.graph.consumers.get(node, [])
                if node in self.graph.roots:
                    self._lose([value], at_output(self._through([value]) + self.graph.output))
                elif self.inside is not None and not set(users) <= self.inside:
                    self._lose([value], "weight is used besides its standardization")
                else:
                    self._push(node, queue, queued)
        self._lose(list(self.values.values()), "output is not normalized within the operations followed")
        return self.norms

    def _step(self, node: Node) -> list[ScaledValue | None]:
        """The values of the node's outputs, from those of its inputs, by the node's rule."""
        inputs = self._inputs(node)
        if all(v is None for v in inputs):
            return []
        rule = rule_for(node.name())
        if rule is None:
            raise self.break_at(node)
        norms = len(self.norms)
        shifted = [v for v in inputs if v is not None and v.shifted]
        outputs = rule(self, node, inputs)
        if any(v is not None and v.offset is not None for v in inputs) and any(
            v is not None and v.offset is None for v in outputs
        ):  # a rule that does not carry a bias's constant along: it may not stay a per-channel constant
            raise ScaleBroken(f"output reaches {self._through(inputs)}{self.where(node)} before any normalization")
        divided = _op(node) == "Div"  # by the shifted value: the product rule checked it cancels the scale
        if shifted and (
            any(v is not None and not v.shifted for v in outputs) or (len(self.norms) > norms and not divided)
        ):
            # a constant added on the way that this node neither carries nor divides by: no normalization
            raise ScaleBroken(f"output reaches {shifted[0].shifted_at}, then {self.where(node)}, not a normalization")
        return outputs

    def _lose(self, values: Sequence[ScaledValue], reason: str) -> None:
        """The channels of ``values`` reach the loss unnormalized."""
        for value in values:
            channels = compact(value.ids).unique()
            self.broken.update(channels[channels >= 0].tolist())
        self.reason = self.reason or reason

    def _push(self, node: Node, queue: list[tuple[int, int, Node]], queued: set[Node]) -> None:
        users = self.graph.consumers.get(node, [])
        for user in users:
            if user not in queued:
                queued.add(user)
                heapq.heappush(queue, (user._sequence_nr(), id(user), user))

    def _inputs(self, node: Node) -> list[ScaledValue | None]:
        return [self.values.get((child, nr)) if child is not None else None for child, nr in node.next_functions]

    def break_at(self, node: Node, why: str = "") -> ScaleBroken:
        """The error that the layer's scale reaches the loss through ``node``: an addition or concatenation
        with something else computed from the layer's output is a use besides the normalization."""
        derived = any(
            child is not None and (child, nr) not in self.values and self._depends(child)
            for child, nr in node.next_functions
        )
        if derived and _op(node) in ("Add", "Sub", "Cat"):
            return ScaleBroken("output is used besides the normalization")
        return ScaleBroken(
            f"output reaches {self._through(self._inputs(node))}{self.where(node, why)} before any normalization"
        )

    @staticmethod
    def _through(values: Sequence[ScaledValue | None]) -> str:
        """``"mix (Linear: Addmm), then "`` when the scale came through a bias on the way, or through a constant
        added to it (``"block (Block: Add), then "``): the first place the user would look at."""
        at = next((v.offset_at for v in values if v is not None and v.offset is not None), "")
        at = at or next((v.shifted_at for v in values if v is not None and v.shifted), "")
        return f"{at}, then " if at else ""

    def where(self, node: Node, why: str = "") -> str:
        """Where the scale went, in the user's terms: the submodule whose forward ran ``node``, with the operation
        in parentheses (``net.2 (Linear: Addmm)``), else the operation (``LogSoftmax``, computed outside any
        submodule: in a loss, say). ``why``: how it breaks the scale, appended to the operation (``", mixing
        channels"``, ``" as a query or key"``)."""
        op, call = _op(node), self.namer(node)
        # A LightningModule's "forward" under DDP is its training_step: what runs there is named alone, as in one
        # process, where it runs outside any module call.
        if call is not None and (call.name or not hasattr(call.module, "training_step")):
            kind = class_name(call.module)
            return f"{call.name or 'the model'} ({kind if kind == op and not why else f'{kind}: {op}{why}'})"
        return f"{op} ({why.removeprefix(', ')})" if why.startswith(", ") else op + why

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

    def add_bias(self, node: Node, slot: int, value: ScaledValue, dim: int) -> ScaledValue:
        """``value``, the product of an input by the layer's weight, plus the bias that input ``slot`` of ``node``
        adds along ``dim`` (``addmm``'s bias, a convolution's): the walk started from the weight itself, so this
        bias is the layer's own, whatever built it (docs/theory.md §1.3).

        Each bias entry copied from a parameter entry joins the channel of the column it is added to
        (:attr:`companions`); an entry no parameter gives is zero when nothing constant went into the bias (an
        in-place zero, Swin V2's key bias), else an unknown constant: its channel is lost. A bias built any
        other way, or a constant tensor, is an unknown constant for every column: the :attr:`ScaledValue.offset`
        that only a batch-statistics normalization cancels.
        """
        child, nr = node.next_functions[slot]
        from_weight = self.start is not None and hasattr(self.start, "variable")
        values = self.graph.bias_values.get(child, ()) if child is not None else ()
        origin = provenance(child, nr, values) if child is not None and from_weight else None
        if origin is None:
            value.offset, value.offset_at = tuple(value.ids.shape), self.where(node)
            return value
        dim %= value.ids.dim()
        columns = rows(compact(value.ids), [dim])
        if bool((columns.amax(1) != columns.amin(1)).any()):
            raise self.break_at(node, ", a bias added across channels")
        channel = columns[:, 0].expand(value.ids.shape[dim]).clone()  # the channel of each column, -1: none
        lost: dict[int, str] = {}  # channel → why it is lost
        for param, (entries, added_to) in origin.sources.items():
            leaf = self.graph.leaf.get(param)
            if leaf is not None and not set(self.graph.consumers.get(leaf, ())) <= origin.nodes | {node}:
                why = f"output reaches {self.where(node)}, whose bias is computed from a tensor used elsewhere too"
                lost.update(dict.fromkeys(channel[added_to].tolist(), why))
                continue
            joined = self.companions.setdefault(param, {})
            for entry, c in zip(entries.tolist(), channel[added_to].tolist(), strict=True):
                if entry in joined and min(joined[entry], c) >= 0 and joined[entry] != c:
                    self.ties.tie(torch.tensor([[joined[entry], c]], dtype=torch.int32))
                joined.setdefault(entry, c)
        unknown = ~(origin.copied | origin.zero).to(channel.device)
        if bool(unknown.any()):
            why = f"output reaches {self.where(node)}, whose bias holds a constant (a buffer, a literal, a value "
            why += "written in place)"
            lost.update(dict.fromkeys(channel[unknown].tolist(), why))
        lost.pop(-1, None)
        if not lost:
            return value
        self.broken.update(lost)
        self.reason = self.reason or next(iter(lost.values()))
        gone = torch.isin(channel, torch.tensor(list(lost), dtype=channel.dtype))
        shape = [1] * value.ids.dim()
        shape[dim] = -1
        ids = torch.where(gone.view(shape), torch.tensor(-1, dtype=value.ids.dtype), value.ids)
        return ScaledValue(value.degree, ids, value.statistic, value.shift_free, value.channels_kept)

    def reduce(self, node: Node, ids: Tensor, dims: Sequence[int]) -> Tensor:
        """Tie the channels met along ``dims``; the result keeps those dims with size 1. An entry that does
        not depend on the layer summed with ones that do breaks the scaling."""
        keep = [d for d in range(ids.dim()) if d not in dims]
        compacted = compact(ids)
        row_ids = rows(compacted, keep)
        if mixes_scaling(row_ids):
            raise self.break_at(node, ", with entries that do not scale")
        self.ties.tie(row_ids)
        reduced = row_ids.amax(1).reshape([compacted.shape[d] if d in keep else 1 for d in range(ids.dim())])
        return reduced.expand([ids.shape[d] if d in keep else 1 for d in range(ids.dim())])

    def merge(self, a: Tensor, b: Tensor) -> Tensor:
        """Element-wise: entries of ``a`` and ``b`` that both scale scale together."""
        shape = torch.broadcast_tensors(a, b)[0].shape  # torch.broadcast_shapes imports the fx machinery
        a, b = torch.broadcast_tensors(compact(a), compact(b))
        both = (a >= 0) & (b >= 0)
        if bool(both.any()):
            self.ties.tie(torch.stack([a[both], b[both]], 1))
        return torch.where(a >= 0, a, b).expand(shape)


def _parts(outputs: Sequence[ScaledValue | None], ties: ChannelTies) -> list[set[int]]:
    """The channels in each output of a node that parts a value (a split, an unbind), with those tied to them so
    far, when no channel is in two of them and at least two hold some; else none."""
    roots: dict[int, set[int]] = {}
    for c in range(len(ties.parent)):
        roots.setdefault(ties.find(c), set()).add(c)
    parts = []
    for v in outputs:
        ids = set(compact(v.ids).unique().tolist()) - {-1} if v is not None else set()
        parts.append(set().union(*(roots[ties.find(i)] for i in ids)) if ids else set())
    parts = [p for p in parts if p]
    if len(parts) < 2 or sum(map(len, parts)) != len(set().union(*parts)):
        return []
    return parts


def at_output(output: str) -> str:
    """Why a layer is not invariant when its scale reaches ``output`` (``"the loss"``, ``"the model's output"``:
    the end of the graph read) unnormalized."""
    return f"output reaches {output} before any normalization"


def _op(node: Node) -> str:
    """The operation of an autograd node, as torch names its forward (``Addmm`` for ``AddmmBackward0``)."""
    name = node.name().removeprefix("torch::autograd::")
    if name == "CopySlices":  # an in-place op on a view: the graph does not say which
        return "an in-place operation on a view"
    return name.removesuffix("Backward0").removesuffix("Backward1")
