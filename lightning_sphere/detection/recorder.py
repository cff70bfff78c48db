"""What a real forward pass did, module by module: the calls :func:`~lightning_sphere.detection.layers.find_candidates`
reads, and the graph they left behind.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.autograd.graph import Node
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

from lightning_sphere.core.names import named_modules
from lightning_sphere.detection.parametrized import computed_node, graph_below, parametrizations
from lightning_sphere.detection.provenance import BiasValues

LAYERS = (_ConvNd, nn.Linear)
EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
#: What detection examines: the layers, and the embeddings, whose rows it follows from the weight alone.
WATCHED = (*LAYERS, *EMBEDDINGS)
CHANNEL_NORMS = (_BatchNorm, _InstanceNorm)


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
        #: the values of the biases built on the spot for a weight (``F.linear(x, w, cat(...))``), by their node
        self.biases = BiasValues()
        self._depth = 0  # module calls entered and not yet left, while the biases' values are kept

    def __enter__(self) -> DataflowRecorder:
        every = True  # recording every layer of the model: its first step
        for name, module in named_modules(self.model):
            every &= not isinstance(module, WATCHED) or self.layers is None or module in self.layers
            if isinstance(module, WATCHED) and (self.layers is None or module in self.layers):
                self._handles.append(module.register_forward_hook(self._hook(name)))
                chain = parametrizations(module).get("weight")
                if chain is not None:
                    self._handles.append(chain.register_forward_hook(self._computed_hook(module)))
        if self._handles and every:
            # Now, not at the first layer's call, when a module already running would skip its hook (and the
            # reasons would name it or not by chance). Waiting for some layers not called yet, hooks stay off
            # every other module until one of them runs: nothing per step.
            self._hook_norms()
        if every:  # the first step, when weights used outside their module are read: keep their biases' values
            for _, module in named_modules(self.model):
                self._handles.append(module.register_forward_pre_hook(self._capture))
                self._handles.append(module.register_forward_hook(self._release, always_call=True))
        return self

    def _capture(self, module: nn.Module, args: Any) -> None:
        """On entering the outermost module call: keep the biases' values until it returns. The mode enters and
        leaves with the module calls, which nest, so that it never leaves a mode of someone else's on the stack."""
        if self._depth == 0:
            self.biases.__enter__()
        self._depth += 1

    def _release(self, module: nn.Module, args: Any, output: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.biases.__exit__(None, None, None)

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._norms_hooked = False

    def _hook_norms(self) -> None:
        """Hook every module but the layers: what computes a normalization is named after it."""
        self._norms_hooked = True
        for name, module in named_modules(self.model):
            if not isinstance(module, WATCHED):
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


class _Graph:
    """The autograd graph reachable from some roots, with each node's consumers."""

    def __init__(self, roots: Sequence[Node]) -> None:
        self.roots = set(roots)
        #: what the roots are, in the user's terms (for the reasons given)
        self.output = "the model's output"
        self.nodes, self.consumers, self.leaf = graph_below(roots)
        #: the values the biases built on the spot held (:class:`~lightning_sphere.detection.provenance.BiasValues`)
        self.bias_values: Mapping[Node, list[Tensor]] = {}


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
