""":func:`find_invariant_groups`: detection and verification on an example input, for plain PyTorch."""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from lightning_sphere.core.groups import InvariantGroups
from lightning_sphere.core.names import named_modules
from lightning_sphere.detection.finder import GroupFinder, GroupsSpec
from lightning_sphere.detection.layers import LAYERS


class FoundGroups(list):
    """The verified groups, one :class:`InvariantGroups` per module, and ``rejected``: module name → why
    it is not tracked; both in model order (``named_modules()``)."""

    def __init__(self, groups: Sequence[InvariantGroups], rejected: Mapping[str, str]) -> None:
        super().__init__(groups)
        self.rejected = dict(rejected)


def find_invariant_groups(
    model: nn.Module, example_input: Any, *, groups: GroupsSpec = "auto", tolerance: float | None = None
) -> FoundGroups:
    """The verified radially invariant groups of ``model``, one entry per module. Plain PyTorch.

    Runs one forward pass in training mode on ``example_input`` (a tensor, a tuple of positional
    arguments or a dict of keyword arguments) and one backward pass of a fixed random projection of
    the outputs, then leaves the model exactly as it found it: weights, gradients, buffers (BatchNorm
    running statistics), train/eval modes and the global random state. Layers under
    ``torch.utils.checkpoint`` are found in both of its modes (with ``use_reentrant=True``, from the forward
    it recomputes during the backward pass). The layers left out are in ``rejected``, with the reason: also
    those not called on ``example_input`` (``"not called yet"``) and frozen ones. A ``torch.compile``'d model
    (or submodule) runs this pass eagerly (``torch.compiler.set_stance("force_eager")``) and is named as the
    uncompiled one. A parametrized or pruned layer is read without computing its weight outside the forward
    pass (spectral normalization's ``_u``/``_v`` buffers are restored with the others).

    ``groups`` chooses the candidates (see :class:`GroupFinder`). Candidates whose gradient is not
    orthogonal to their weights (max ``|cos(g, x)|`` above ``tolerance``/√d) are dropped with a warning.
    Candidates the projection gives no gradient (a zero-initialized BatchNorm weight downstream, a zero
    residual branch) are verified with a probe: a random cotangent on their normalization's output before
    its affine part (on a weight-standardized layer's own output), which any invariant group's gradient is
    orthogonal to as well.

    >>> import torch
    >>> from torch import nn
    >>> from lightning_sphere import summarize
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(
    ...     nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(288, 10)
    ... )
    >>> groups = find_invariant_groups(model, torch.randn(4, 3, 8, 8))
    >>> print(summarize(groups, model, groups.rejected))  # doctest: +ELLIPSIS
    lightning_sphere: 1 module, 8 radially invariant groups, 216 of 3,122 trainable parameters tracked (6.9%)
    module  granularity  groups   d  normalization    max|cos(g,x)|
    0       channel           8  27  1 (BatchNorm2d)        ...
    not tracked:
      4: output reaches the model's output before any normalization

    Raises:
        ValueError: for a ``groups`` mapping that names what the model does not have.
    """
    finder = GroupFinder(model, groups, tolerance)
    norm_inputs: list[tuple[nn.Module, Tensor]] = []
    layer_outputs: dict[str, Tensor] = {}  # a weight-standardized layer is its own normalization

    def note_input(module: nn.Module, args: Any, output: Any) -> None:  # returns None: the output stays as it is
        norm_inputs.append((module, args[0]))

    hooks = [m.register_forward_hook(note_input) for m in model.modules() if isinstance(m, _PROBED)]

    def keep(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:  # returns None: the output stays as it is
            layer_outputs.setdefault(name, output)

        return hook

    hooks += [m.register_forward_hook(keep(name)) for name, m in named_modules(model) if isinstance(m, LAYERS)]
    modes = {module: module.training for module in model.modules()}
    buffers = {buffer: buffer.clone() for buffer in model.buffers()}
    grads = {p: p.grad for p in model.parameters()}
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    # Compiled code would skip the recording hooks: this one pass runs eagerly, as the monitor's recorded step
    # does (the compiled graphs are untouched). Without torch._dynamo imported, nothing compiled can run.
    compiled = "torch._dynamo" in sys.modules
    eager = torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext()
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), eager:
            model.train()
            if finder.auto:
                finder.start()
            try:
                outputs = _call(model, example_input)
                roots = [t for t in _tensors(outputs) if t.requires_grad and t.is_floating_point()]
                if finder.auto:
                    finder.analyze(roots)
                if (finder.pending or finder.has_layer_calls()) and roots:
                    torch.manual_seed(0)
                    projection = sum((t * torch.randn_like(t)).sum() for t in roots)
                    assert isinstance(projection, Tensor)  # a sum of tensors: roots is not empty
                    for p in grads:
                        p.grad = None
                    # .backward(), not autograd.grad(): torch.utils.checkpoint(use_reentrant=True) supports only
                    # it, and recomputes its forward during it, with a graph that can be read.
                    projection.backward(retain_graph=bool(norm_inputs or layer_outputs))
                    finder.analyze_recomputed()
                    rejected = finder.verify(_gradients(finder))
                    if finder.pending:  # no gradient from the outputs: probe the normalizations
                        normalized = [_normalized(norm, x) for norm, x in norm_inputs if x.requires_grad]
                        normalized += [
                            layer_outputs[e.module_name]
                            for e in finder.pending
                            if e.norm_name == e.module_name and e.module_name in layer_outputs
                        ]
                        probe = sum(
                            (n * torch.randn_like(n)).sum()
                            for n in normalized
                            if isinstance(n, Tensor) and n.requires_grad
                        )
                        if isinstance(probe, Tensor) and probe.requires_grad:
                            for p in grads:
                                p.grad = None
                            probe.backward()
                            rejected += finder.verify(_gradients(finder))
                    for entry in rejected:
                        warnings.warn(
                            f"{entry.module_name}: {finder.rejected[entry.module_name]}; not tracked", stacklevel=2
                        )
            finally:
                finder.finish()
    finally:
        for handle in hooks:
            handle.remove()
        for p, grad in grads.items():
            p.grad = grad
        for module, training in modes.items():
            module.train(training)
        with torch.no_grad():
            for buffer, saved in buffers.items():
                buffer.copy_(saved)
    finder.reject(
        [e for e in finder.pending if finder.eligible(e)], "no gradient on the example input to verify it with"
    )
    return FoundGroups(finder.accepted, finder.untracked(tracked={g.module_name for g in finder.accepted}))


def _gradients(finder: GroupFinder) -> dict[nn.Parameter, Tensor]:
    """The gradients the pending candidates' parameters hold."""
    return {p: p.grad for entry in finder.pending for p in entry.params if p.grad is not None}


#: The normalization modules a probe can reproduce (:func:`_normalized`).
_PROBED = (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


def _normalized(norm: nn.Module, x: Tensor) -> Tensor | None:
    """``x`` normalized as ``norm`` does in training mode, before its affine part (which a zero-initialized
    weight would make constant)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return None
    if isinstance(norm, _InstanceNorm):
        return F.instance_norm(x, eps=norm.eps)
    if isinstance(norm, _BatchNorm):
        return F.batch_norm(x, None, None, training=True, eps=norm.eps)
    if isinstance(norm, nn.GroupNorm):
        return F.group_norm(x, norm.num_groups, eps=norm.eps)
    if isinstance(norm, nn.LayerNorm):
        return F.layer_norm(x, norm.normalized_shape, eps=norm.eps)
    if isinstance(norm, nn.RMSNorm):
        return F.rms_norm(x, norm.normalized_shape, eps=norm.eps)
    return None


def _call(model: nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, Mapping):
        return model(**example_input)
    if isinstance(example_input, tuple | list):
        return model(*example_input)
    return model(example_input)


def _tensors(value: Any) -> Iterator[Tensor]:
    """Every tensor in a nested structure of tuples, lists and dicts."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _tensors(item)
