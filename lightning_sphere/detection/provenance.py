"""Where the entries of a computed bias come from: which parameter entry each one copies, read off the graph.

A layer whose weight is used outside its module (``F.linear(x, self.qkv.weight, bias)``: torchvision's Swin V2,
timm's EVA) often gets a bias built on the spot: ``torch.cat((q_bias, k_bias, v_bias))``, or its own bias cloned
with the key part zeroed. A group of the weight's rows is invariant only if the bias entries added to those
rows scale with them: so the walk needs, for each bias entry, the parameter entry it is a copy of, or that it is
zero, or that it is some constant.

The graph says it without any value: back-propagating an index through the nodes that built the bias (calling
each autograd node on a probe gradient, as the engine would) lands, at each parameter's ``AccumulateGrad``
node, on the index of the bias entry that copies it. Only nodes that move, copy or zero entries are allowed on
the way, and a second probe checks that every parameter entry is copied once, unscaled; the values the bias held
in the forward pass (kept by :class:`BiasValues` while the pass is recorded) check what the graph cannot tell
(docs/theory.md §1.3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.autograd.graph import Node
from torch.overrides import TorchFunctionMode

from lightning_sphere.detection.nodes import signed

#: Autograd nodes that only move, copy, cast or overwrite entries: a bias built by these is a selection of
#: parameter entries, zeros and constants. ``CopySlices`` is an in-place write into a slice (``b[k:2k].zero_()``).
MOVES = frozenset(
    {
        "CatBackward0",
        "CloneBackward0",
        "ToCopyBackward0",
        "AliasBackward0",
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "SliceBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "UnsqueezeBackward0",
        "torch::autograd::CopySlices",
        "CopySlices",
    }
)

#: Largest bias read: the probe's indices must be exact in float32 (and their squares, below 2**24).
MAX_ENTRIES = 4096


@dataclass
class Provenance:
    """What each entry of a bias ``(N,)`` is.

    Attributes:
        sources: parameter → ``(entries, bias_entries)``: entry ``entries[i]`` of the parameter is copied into
            entry ``bias_entries[i]`` of the bias (int64 tensors).
        copied: ``(N,)`` bool, entries copied from a parameter.
        zero: ``(N,)`` bool, entries known to be zero (a part left out or zeroed in place, its value seen zero);
            an entry neither copied nor zero may be any constant.
        nodes: the nodes that built the bias, down to the parameters' ``AccumulateGrad`` nodes.
    """

    sources: dict[nn.Parameter, tuple[Tensor, Tensor]]
    copied: Tensor
    zero: Tensor
    nodes: set[Node]


def provenance(node: Node, nr: int = 0, values: Sequence[Tensor] = ()) -> Provenance | None:
    """Where the entries of output ``nr`` of ``node`` (a 1-D bias) come from; ``None`` when the graph that built
    it does anything but move, copy or overwrite parameter entries, or when it is larger than :data:`MAX_ENTRIES`.

    ``values``: what the bias held in the forward pass (:class:`BiasValues`), which the graph does not keep. An
    in-place write into a slice (``CopySlices``) hides what it wrote: ``zero_()`` and ``fill_(c)`` look alike,
    and ``add_(c)`` looks like a copy. With the values, a copied entry must hold its parameter entry and an entry
    written must hold zero; without them, nothing written in place is trusted.
    """
    shape = tuple(node._input_metadata[nr].shape)  # the bias's shape, as the node received it
    if len(shape) != 1 or not 0 < shape[0] <= MAX_ENTRIES:
        return None
    nodes, constant = _below(node)
    if nodes is None:
        return None
    meta = node._input_metadata[nr]
    index = torch.arange(1, shape[0] + 1, dtype=meta.dtype, device=meta.device)
    first, second = _probe(node, nr, nodes, index), _probe(node, nr, nodes, index * index)
    if first is None or second is None:
        return None
    sources: dict[nn.Parameter, tuple[Tensor, Tensor]] = {}
    copied = torch.zeros(shape[0], dtype=torch.bool, device=meta.device)
    for param, g in first.items():
        g, g2 = g.flatten(), second[param].flatten()
        entries = g.nonzero().flatten()
        bias_entries = g[entries].round().long() - 1
        # each parameter entry copied once, unscaled: the squared probe lands on the square of the same index
        if bool(((bias_entries < 0) | (bias_entries >= shape[0])).any()):
            return None
        if not torch.equal(g2[entries], ((bias_entries + 1) ** 2).to(g2.dtype)) or bool(copied[bias_entries].any()):
            return None
        if bias_entries.unique().numel() != bias_entries.numel():
            return None
        for value in values:  # what was copied holds the parameter's entry (an in-place add_ would not)
            same = value.to(param.device).flatten()[bias_entries] == param.detach().flatten()[entries]
            entries, bias_entries = entries[same], bias_entries[same]
        copied[bias_entries] = True
        sources[param] = (entries, bias_entries)
    written = any(n.name() in _IN_PLACE for n in nodes)
    if values:
        zero = ~copied & torch.stack([v.to(copied.device).flatten() == 0 for v in values]).all(0)
    else:
        zero = ~copied & (not constant and not written)
    return Provenance(sources, copied, zero, nodes)


_IN_PLACE = frozenset({"torch::autograd::CopySlices", "CopySlices"})


class BiasValues(TorchFunctionMode):
    """While active, keeps the value of each bias built on the spot (a tensor with an autograd node, at most
    :data:`MAX_ENTRIES` entries) that ``F.linear``, ``addmm`` or a convolution receives, by that node: what
    :func:`provenance` checks the graph's reading against. Active during the recorded forward passes only."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[Node, list[Tensor]] = {}

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        slot = _BIAS_SLOT.get(func)
        if slot is not None:
            bias = args[slot] if len(args) > slot else kwargs.get("bias" if slot else "input")
            built = isinstance(bias, Tensor) and bias.grad_fn is not None and bias.dim() == 1
            if built and bias.numel() <= MAX_ENTRIES:
                self.values.setdefault(bias.grad_fn, []).append(bias.detach().clone())
        return func(*args, **kwargs)


#: The functions that add a bias to a product by a weight, and the position of the bias among their arguments.
_BIAS_SLOT: dict[Any, int] = {
    torch.nn.functional.linear: 2,
    torch.addmm: 0,
    torch.nn.functional.conv1d: 2,
    torch.nn.functional.conv2d: 2,
    torch.nn.functional.conv3d: 2,
}


def _below(root: Node) -> tuple[set[Node] | None, bool]:
    """The nodes that built ``root``'s output, down to the leaves, if all are :data:`MOVES` (or leaves); and
    whether an input on the way is constant (an edge to no node)."""
    nodes: set[Node] = set()
    constant = False
    stack = [root]
    while stack:
        node = stack.pop()
        if node in nodes:
            continue
        nodes.add(node)
        if hasattr(node, "variable"):
            constant |= not isinstance(node.variable, nn.Parameter)  # a tensor no optimizer steps, as a constant
            continue
        if node.name() not in MOVES:
            return None, constant
        for child, _ in node.next_functions:
            if child is None:
                constant = True
            else:
                stack.append(child)
    return nodes, constant


def _probe(root: Node, nr: int, nodes: set[Node], grad: Tensor) -> dict[nn.Parameter, Tensor] | None:
    """Back-propagate ``grad`` from output ``nr`` of ``root`` through ``nodes`` (latest first, as the engine
    does): the gradient that reaches each parameter."""
    pending: dict[tuple[Node, int], Tensor] = {(root, nr): grad}
    reached: dict[nn.Parameter, Tensor] = {}
    for node in sorted(nodes, key=lambda n: -signed(n._sequence_nr())):  # leaves (numbered -1) last
        metas = node._input_metadata
        grads = [pending.pop((node, i), None) for i in range(len(metas))]
        if all(g is None for g in grads):
            continue
        variable = getattr(node, "variable", None)
        if variable is not None:
            if isinstance(variable, nn.Parameter):
                assert grads[0] is not None
                reached[variable] = grads[0]
            continue
        full = [
            g if g is not None else torch.zeros(m.shape, dtype=m.dtype, device=m.device)
            for g, m in zip(grads, metas, strict=True)
        ]
        try:
            out = cast(Any, node)(*full)  # the backward function, as the engine calls it
        except Exception:  # a node that cannot be called outside the engine: the provenance is not known
            return None
        out = out if isinstance(out, tuple) else (out,)
        for (child, child_nr), g in zip(node.next_functions, out, strict=True):
            if child is None or g is None:
                continue
            key = (child, child_nr)
            pending[key] = g if key not in pending else pending[key] + g
    return reached
