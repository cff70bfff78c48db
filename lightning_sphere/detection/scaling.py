"""How a value scales with a layer: the vocabulary shared by the scaling walk and its operation rules.

Scale a layer's output channels by ρ_c > 0. Every tensor computed from that output then scales, entry by entry,
as ``ρ[c] ** k`` for one degree ``k`` and a channel ``c`` per entry (:class:`ScaledValue`); operations that
reduce or contract over entries of several channels tie those channels into one group (:class:`ChannelTies`),
and a value of degree 0 is a normalization reached (:class:`NormReached`). :mod:`~lightning_sphere.detection.walk`
follows the values through the autograd graph; :mod:`~lightning_sphere.detection.operations` says, for each
autograd operation, how its outputs scale given its inputs (a :data:`Rule`), using of the walk only what
:class:`WalkContext` offers.

Channel ids are ``int32`` tensors shaped like the value (``-1``: the entry does not depend on the layer), most
of them broadcast views of a much smaller tensor: the helpers here keep them so (:func:`compact`,
:func:`reshape_ids`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

import torch
from torch import Tensor
from torch.autograd.graph import Node

from lightning_sphere.detection.nodes import signed
from lightning_sphere.detection.recorder import _Call


@dataclass
class ScaledValue:
    """How one tensor of the forward pass scales with the layer: by ``ρ[c] ** degree`` entry by entry, c the
    channel in ``ids`` (shaped like the tensor; -1 where an entry does not depend on the layer)."""

    degree: Fraction
    ids: Tensor
    statistic: bool = False  # a norm or variance: adding eps to it is the normalization's own approximation
    shift_free: bool = True  # a per-channel shift of the layer's output would still be a per-channel shift
    channels_kept: bool = True  # no operation on the way moved or mixed channels
    #: the shape of the value where a bias on the way (a convolution's or a linear layer's, unscaled) added a
    #: constant per entry of dim 1; ``None`` if none did. Only a normalization that subtracts each dim-1 channel's
    #: mean (batch statistics) cancels it, reached with the shape unchanged through shift-commuting moves.
    offset: tuple[int, ...] | None = None
    #: where that bias was added, in the user's terms (``mix (Conv2d: Convolution)``)
    offset_at: str = ""
    #: where a constant was added to the value, which is no statistic (``q · Σk + eps``), if one was: only a
    #: division by it that cancels the scale may follow (the normalization up to that constant, as up to an eps)
    shifted_at: str = ""

    @property
    def shifted(self) -> bool:
        return bool(self.shifted_at)

    def moved(self, ids: Tensor, keeps_channels: bool = True, keeps_shift: bool = True) -> ScaledValue:
        """The same scaling with its entries moved to ``ids`` (a view, an element-wise map, a pooling).

        ``keeps_channels``: channel c of the result is still output channel c of the layer (an element-wise
        map, a pooling, a squeeze; not a permutation, slice or reduction). ``keeps_shift``: the operation
        commutes with adding a per-channel constant (a view, a copy; not a relu), so that a centering
        normalization after it still cancels the layer's bias.
        """
        if self.offset is not None and not (keeps_shift and keeps_channels and tuple(ids.shape) == self.offset):
            raise ScaleBroken(
                f"output reaches {self.offset_at}, whose bias no normalization of each channel cancels after it"
            )
        return ScaledValue(
            self.degree,
            ids,
            statistic=self.statistic,
            shift_free=self.shift_free and keeps_shift,
            channels_kept=self.channels_kept and keeps_channels,
            offset=self.offset,
            offset_at=self.offset_at,
            shifted_at=self.shifted_at,
        )


@dataclass
class NormReached:
    """A normalization reached: the node that cancelled the scale, and what it says about the bias."""

    node: Node
    cancels_shift: bool
    fused_channel_norm: bool
    channels_kept: bool
    #: how many values each set it normalizes holds (a fused norm's; ``None`` for one written by hand)
    count: int | None = None
    #: where a constant of unknown size was added to the divisor (a hand-written eps), if one was
    constant_at: str = ""


class ScaleBroken(Exception):
    """The layer's scale reaches the loss: the message says where."""


class ChannelTies:
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


class WalkContext(Protocol):
    """What an operation's rule may use of the walk that applies it
    (:class:`~lightning_sphere.detection.walk.ScalingWalk`)."""

    #: The channels tied so far.
    ties: ChannelTies
    #: The normalizations reached so far; a rule that cancels the scale appends one.
    norms: list[NormReached]
    #: The recorded module call that computed a node (the name of a normalization), if any.
    namer: Callable[[Node], _Call | None]

    def break_at(self, node: Node, why: str = "") -> ScaleBroken:
        """The error that the layer's scale reaches the loss through ``node`` (``why``: a detail)."""
        ...

    def where(self, node: Node, why: str = "") -> str:
        """``node`` in the user's terms: the module whose forward ran it, with the operation."""
        ...

    def reduce(self, node: Node, ids: Tensor, dims: Sequence[int]) -> Tensor:
        """Tie the channels met along ``dims`` of ``ids``; the result keeps those dims with size 1."""
        ...

    def merge(self, a: Tensor, b: Tensor) -> Tensor:
        """Element-wise: entries of ``a`` and ``b`` that both scale scale together."""
        ...

    def add_bias(self, node: Node, slot: int, value: ScaledValue, dim: int) -> ScaledValue:
        """``value`` (a product by the layer's weight) plus the bias that input ``slot`` of ``node`` adds along
        ``dim``: the bias entries copied from parameters join the channel they are added to."""
        ...


#: What an autograd operation does to a scale: given the walk and the values of the node's inputs (``None``
#: where an input does not scale with the layer; at least one does), the values of its outputs (``None``:
#: that output no longer scales), or raise :class:`ScaleBroken` (through :meth:`WalkContext.break_at`).
Rule = Callable[[WalkContext, Node, list[ScaledValue | None]], list[ScaledValue | None]]


def first_scaled(inputs: Sequence[ScaledValue | None]) -> ScaledValue:
    """The value of the node's first input that scales with the layer."""
    return next(v for v in inputs if v is not None)


def sole_input(walk: WalkContext, node: Node, inputs: Sequence[ScaledValue | None]) -> ScaledValue:
    """The value of the node's input 0, when it alone scales with the layer (not a weight, not a second
    operand); otherwise the scale breaks at the node."""
    if [i for i, v in enumerate(inputs) if v is not None] != [0]:
        raise walk.break_at(node)
    value = inputs[0]
    assert value is not None
    return value


def output_shape(node: Node, nr: int = 0) -> tuple[int, ...]:
    """The shape of the node's forward output ``nr`` (the autograd node's input metadata)."""
    return tuple(node._input_metadata[nr].shape)


def saved_dims(node: Node, ndim: int) -> list[int]:
    """The dimensions a reduction node reduced over (all of them when it saved none), non-negative, sorted."""
    dims = getattr(node, "_saved_dim", None)
    if dims is None or (isinstance(dims, tuple | list) and len(dims) == 0):
        return list(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return sorted({signed(d) % ndim for d in dims}) if ndim else []


def compact(ids: Tensor) -> Tensor:
    """``ids`` without its broadcast dimensions (stride 0: every entry along them is the same), kept with
    size 1: what every reduction and comparison needs, at a fraction of the size."""
    return ids[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in ids.stride())]


def reshape_ids(ids: Tensor, shape: Sequence[int]) -> Tensor:
    """``ids.reshape(shape)``, without materializing leading broadcast dimensions that the reshape keeps."""
    lead = 0
    while lead < min(ids.dim(), len(shape)) and ids.shape[lead] == shape[lead] and ids.stride(lead) == 0:
        lead += 1
    if lead == 0:
        return ids.reshape(shape)
    inner = ids[(slice(0, 1),) * lead].reshape(*[1] * lead, *shape[lead:])
    return inner.expand(*shape)


def rows(ids: Tensor, keep: Sequence[int]) -> Tensor:
    """``ids`` as one row per index of the ``keep`` dimensions, the other dimensions along the row."""
    rest = [d for d in range(ids.dim()) if d not in keep]
    return ids.permute(*keep, *rest).reshape(math.prod(ids.shape[d] for d in keep), -1)


def mixes_scaling(row_ids: Tensor) -> bool:
    """Whether some row of ``row_ids`` ``(P, R)`` holds both entries that scale and entries that do not: summed
    or normalized together, they no longer scale as one power of ρ."""
    return bool(((row_ids < 0).any(1) & (row_ids >= 0).any(1)).any())
