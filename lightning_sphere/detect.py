"""Finding a model's radially invariant groups: structure from the graph, proof from the gradient.

:class:`GroupFinder` is the shared procedure: record one forward pass, read candidates off its
autograd graph (:mod:`lightning_sphere.dataflow`), then keep only those whose gradient is orthogonal
to their weights (THEORY.md §1). The Lightning callback feeds it the first real training step, at no
extra cost; :func:`find_invariant_groups` feeds it an example input, for plain PyTorch.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from lightning_sphere.dataflow import DataflowRecorder, find_candidates
from lightning_sphere.groups import (
    GRADIENT_TEST,
    InvariantGroups,
    indistinct,
    noise_floor,
    random_cosine,
    tolerance_for,
    verify,
)
from lightning_sphere.layouts import mapped_groups, numeric_candidates, weight_norm_groups

#: What to look for: ``"auto"`` (the graph, plus weight normalization), ``"numeric"`` (every parameter of two
#: or more dimensions, from its gradient alone) or a mapping from module or parameter names to a granularity.
GroupsSpec = str | Mapping[str, str | int]


class GroupFinder:
    """Candidates from real forward passes, verified by the gradients of real steps.

    Args:
        model: the model whose groups to find.
        groups: ``"auto"``: layers whose output only feeds a normalization, read off the autograd graph of a
            recorded forward pass (:meth:`start`, :meth:`analyze`), and weight-normalized tensors;
            ``"numeric"``: every trainable parameter of two or more dimensions, kept per output channel if
            its gradient passes the test, else as a whole if that passes; or a mapping from module or
            parameter names to ``"channel"``, ``"layer"`` or a number of channels per group.
        tolerance: δ of the gradient test: a module is tracked while ``max |cos(g, x)|`` over its groups is at
            most δ/√d, a share of what a random direction shows (:func:`~lightning_sphere.groups.tolerance_for`);
            ``None``: 0.1 for candidates the structure vouches for, 0.01 for numeric ones.
        compute_dtype: the dtype gradients are computed in under mixed precision, if 16-bit: the
            threshold is at least a few of its ulps (:func:`~lightning_sphere.groups.noise_floor`).

    Raises:
        ValueError: for a mapping that names what the model does not have, or a granularity it cannot take.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: GroupsSpec = "auto",
        tolerance: float | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.tolerance = tolerance
        self.compute_dtype = compute_dtype
        self.accepted: list[InvariantGroups] = []
        #: Modules left out, with the reason.
        self.rejected: dict[str, str] = {}
        self._recorder: DataflowRecorder | None = None
        #: Coarser candidates to try when a finer one fails its test (numeric: per channel, then whole).
        self._fallback: dict[str, InvariantGroups] = {}
        if groups == "auto":
            self.pending = weight_norm_groups(model)
            self.analyzed = False
        elif groups == "numeric":
            pairs = numeric_candidates(model)
            self.pending = [per_channel for per_channel, _ in pairs]
            self._fallback = {whole.module_name: whole for _, whole in pairs}
            self.analyzed = True
        elif isinstance(groups, Mapping):
            self.pending = mapped_groups(model, groups)
            self.analyzed = True
        else:
            raise ValueError(f'groups must be "auto", "numeric" or a mapping of names to granularities, got {groups!r}')

    @property
    def done(self) -> bool:
        """Whether every candidate is decided (for ``"auto"``, once a graph was analyzed)."""
        return self.analyzed and not self.pending

    def start(self) -> None:
        """Record the layer and normalization calls of the forward passes that follow."""
        self.stop()
        self._recorder = DataflowRecorder(self.model).__enter__()

    def stop(self) -> None:
        """Stop recording; what was recorded stays available to :meth:`analyze`."""
        if self._recorder is not None:
            self._recorder.__exit__()

    def analyze(self, roots: Sequence[Tensor]) -> None:
        """Read candidates off the graph that produced ``roots`` (its nodes must still be alive).

        A module already decided keeps its decision; one found invalid in any analyzed graph is rejected.
        """
        if self._recorder is None:
            raise RuntimeError("GroupFinder.analyze() needs a recorded forward pass: call start() first")
        declared = {s.param for g in self.pending for s in g.slices}
        weight_normed = [m for m in self.model.modules() if any(p in declared for p in m.parameters())]
        found = find_candidates(self._recorder.calls, roots, self.model, exclude=weight_normed)
        self._recorder.calls.clear()  # drop the references to the graph
        decided = {g.module_name for g in self.accepted} | set(self.rejected)
        for name, reason in found.rejected.items():
            if name not in decided:
                self.rejected[name] = reason
        self.pending = [g for g in self.pending if g.module_name not in self.rejected]
        known = decided | {g.module_name for g in self.pending} | set(self.rejected)
        self.pending += [g for g in found.groups if g.module_name not in known]
        self.analyzed = True

    def verify(self, grads: Mapping[nn.Parameter, Tensor]) -> list[InvariantGroups]:
        """Decide the pending candidates whose gradients are in ``grads``; return those rejected.

        One device-to-host transfer (two when coarser fallbacks are tried). Candidates without a usable
        gradient stay pending.
        """
        accepted, rejected, self.pending = verify(self.pending, grads, self.tolerance, self.compute_dtype)
        retry = [self._fallback.pop(entry.module_name) for entry in rejected if entry.module_name in self._fallback]
        if retry:
            accepted_again, rejected_again, _ = verify(retry, grads, self.tolerance, self.compute_dtype)
            accepted += accepted_again
            retried = {entry.module_name for entry in retry}
            rejected = [e for e in rejected if e.module_name not in retried] + rejected_again
        self.accepted += accepted
        for entry in rejected:
            self.rejected[entry.module_name] = self._why(entry)
        return rejected

    def _why(self, entry: InvariantGroups) -> str:
        """The true reason a candidate failed the gradient test."""
        d = entry.group_size
        yardstick = (
            f"max |cos(g, x)| = {entry.cosine:.1e} > {tolerance_for(entry, self.tolerance, self.compute_dtype):.1e}, "
            f"while a random direction shows about 1/√d = {random_cosine(d):.1e} (d = {d:,})"
        )
        if entry.norm_type == GRADIENT_TEST:
            if indistinct(entry, self.compute_dtype):
                floor = noise_floor(self.compute_dtype or entry.slices[0].param.dtype)
                return (
                    f"the gradient test cannot tell at d = {d:,}: 16-bit round-off ({floor:.1e}) reaches what a random "
                    "direction shows; name it in groups= to track it"
                )
            return f"gradient not orthogonal to the weights: {yardstick}"
        eps = getattr(self._norm(entry), "eps", None)
        if isinstance(eps, float) and eps > 0:
            return (
                f"invariant only up to the eps of {entry.norm_name} ({entry.norm_type}), eps={eps:g}, which is not "
                f"small next to the variance it normalizes on this batch: {yardstick}"
            )
        return f"gradient not orthogonal to the weights, whatever the structure says: {yardstick}"

    def _norm(self, entry: InvariantGroups) -> nn.Module | None:
        try:
            return self.model.get_submodule(entry.norm_name) if entry.norm_name else None
        except AttributeError:
            return None

    def restore(self, accepted: Mapping[str, float], rejected: Mapping[str, str]) -> None:
        """Decide pending candidates as an earlier run did (module name → cosine, or → reason), so that a
        resumed run tracks the same groups without testing them again."""
        for entry in self.pending:
            if entry.module_name in accepted:
                self.accepted.append(replace(entry, cosine=accepted[entry.module_name]))
            elif entry.module_name in rejected:
                self.rejected[entry.module_name] = rejected[entry.module_name]
        decided = set(accepted) | set(rejected)
        self.pending = [entry for entry in self.pending if entry.module_name not in decided]

    def reject(self, entries: Sequence[InvariantGroups], why: str) -> None:
        """Reject pending candidates without a verdict from their gradient, with the reason ``why``."""
        for entry in entries:
            self.rejected[entry.module_name] = why
        self.pending = [entry for entry in self.pending if entry not in entries]


class FoundGroups(list):
    """The verified groups, one :class:`InvariantGroups` per module, and ``rejected``: module name → why
    it is not tracked."""

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
    running statistics), train/eval modes and the global random state.

    ``groups`` chooses the candidates (see :class:`GroupFinder`). Candidates whose gradient is not
    orthogonal to their weights (max ``|cos(g, x)|`` above ``tolerance``/√d) are dropped with a warning.
    Candidates the projection gives no gradient (a zero-initialized BatchNorm weight downstream, a zero
    residual branch) are verified with a probe: a random cotangent on their normalization's output before
    its affine part, which any invariant group's gradient is orthogonal to as well.

    >>> import torch
    >>> from torch import nn
    >>> from lightning_sphere import summarize
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(
    ...     nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(288, 10)
    ... )
    >>> groups = find_invariant_groups(model, torch.randn(4, 3, 8, 8))
    >>> print(summarize(groups, model, groups.rejected))  # doctest: +ELLIPSIS
    lightning_sphere: 1 modules, 8 radially invariant groups, 216 of 3,122 trainable parameters tracked (6.9%)
    module  granularity  groups   d  normalization    max|cos(g,x)|
    0       channel           8  27  1 (BatchNorm2d)        ...
    not tracked:
      4: output is not normalized

    Raises:
        ValueError: for a ``groups`` mapping that names what the model does not have.
    """
    finder = GroupFinder(model, groups, tolerance)
    norm_inputs: list[tuple[nn.Module, Tensor]] = []
    hooks = [
        m.register_forward_hook(lambda module, args, output: norm_inputs.append((module, args[0])))
        for m in model.modules()
        if isinstance(m, _PROBED)
    ]
    modes = {module: module.training for module in model.modules()}
    buffers = {buffer: buffer.clone() for buffer in model.buffers()}
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            model.train()
            recording = not finder.analyzed
            if recording:
                finder.start()
            try:
                outputs = _call(model, example_input)
            finally:
                finder.stop()
            roots = [t for t in _tensors(outputs) if t.requires_grad and t.is_floating_point()]
            if recording:
                finder.analyze(roots)
            torch.manual_seed(0)
            projection = sum((t * torch.randn_like(t)).sum() for t in roots)
            rejected = _verify_with(finder, projection, retain_graph=bool(norm_inputs))
            if finder.pending and norm_inputs:  # no gradient from the outputs: probe the normalizations
                probe = [(_normalized(norm, x), x) for norm, x in norm_inputs]
                probe = sum((n * torch.randn_like(n)).sum() for n, x in probe if n is not None and x.requires_grad)
                rejected += _verify_with(finder, probe)
            for entry in rejected:
                warnings.warn(f"{entry.module_name}: {finder.rejected[entry.module_name]}; not tracked", stacklevel=2)
    finally:
        for handle in hooks:
            handle.remove()
        for module, training in modes.items():
            module.train(training)
        with torch.no_grad():
            for buffer, saved in buffers.items():
                buffer.copy_(saved)
    finder.reject(finder.pending, "no gradient on the example input to verify it with")
    return FoundGroups(finder.accepted, finder.rejected)


def _verify_with(finder: GroupFinder, function: Any, retain_graph: bool = False) -> list[InvariantGroups]:
    """Verify the pending candidates on the gradient of ``function`` (a scalar tensor, or 0 when nothing
    could be built); return those rejected."""
    params = [p for entry in finder.pending for p in entry.params]
    if not params or not isinstance(function, Tensor) or not function.requires_grad:
        return []
    grads = torch.autograd.grad(function, params, allow_unused=True, retain_graph=retain_graph)
    return finder.verify({p: g for p, g in zip(params, grads, strict=True) if g is not None})


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
