"""The scaling walk: how a layer's scale propagates forward through the autograd graph, operation by operation.

Each value on the way is tracked as a degree ``k`` (it scales by ``ρ**k``) and, entry by entry, the output
channel it scales with (``-1``: it does not depend on the layer). Operations that reduce or contract over
entries of several channels (a mean, a matrix product, a normalization) tie those channels into one group
(:class:`_Ties`). The tables of what each operation does are in :mod:`lightning_sphere.detection.operations`.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor
from torch.autograd.graph import Node
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_sphere.detection.operations import (
    _BATCH_NORMS,
    _CHANNEL_KEEPING,
    _ELEMENTWISE_SHIFT_BREAKING,
    _ELEMENTWISE_SHIFT_COMMUTING,
    _MAX_STEPS,
    _REDUCTIONS,
    _RESHAPES,
    _SPATIAL,
    _STATISTICS,
)
from lightning_sphere.detection.recorder import _Call, _Graph


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
