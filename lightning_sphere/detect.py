"""Finding a model's radially invariant groups: structure from the graph, proof from the gradient.

:class:`GroupFinder` is the shared procedure: record one forward pass, read candidates off its
autograd graph (:mod:`lightning_sphere.dataflow`), then keep only those whose gradient is orthogonal
to their weights (THEORY.md §1). The Lightning callback feeds it the first real training step, at no
extra cost; :func:`find_invariant_groups` feeds it an example input, for plain PyTorch.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sphere.dataflow import DataflowRecorder, find_candidates
from lightning_sphere.groups import COSINE_TOLERANCE, InvariantGroups, tolerance_for, verify


class GroupFinder:
    """Candidates from real forward passes, verified by the gradients of real steps.

    Args:
        model: the model whose groups to find.
        tolerance: largest ``max |cos(g, x)|`` a module may show and still be tracked (float32).
        compute_dtype: the dtype gradients are computed in under mixed precision, if 16-bit: the
            tolerance widens to a few of its ulps (:func:`~lightning_sphere.groups.cosine_tolerance`).
    """

    def __init__(
        self, model: nn.Module, tolerance: float = COSINE_TOLERANCE, compute_dtype: torch.dtype | None = None
    ) -> None:
        self.model = model
        self.tolerance = tolerance
        self.compute_dtype = compute_dtype
        self.pending: list[InvariantGroups] = []
        self.accepted: list[InvariantGroups] = []
        #: Modules left out, with the reason.
        self.rejected: dict[str, str] = {}
        self.analyzed = False
        self._recorder: DataflowRecorder | None = None

    @property
    def done(self) -> bool:
        """Whether a graph was analyzed and every candidate decided."""
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
        found = find_candidates(self._recorder.calls, roots, self.model)
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

        One device-to-host transfer. Candidates without a usable gradient stay pending.
        """
        accepted, rejected, self.pending = verify(self.pending, grads, self.tolerance, self.compute_dtype)
        self.accepted += accepted
        for entry in rejected:
            limit = tolerance_for(entry, self.tolerance, self.compute_dtype)
            self.rejected[entry.module_name] = (
                f"gradient not orthogonal to the weights: max |cos(g, x)| = {entry.cosine:.1e} > {limit:.1e}"
            )
        return rejected

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


def find_invariant_groups(model: nn.Module, example_input: Any, *, tolerance: float = COSINE_TOLERANCE) -> FoundGroups:
    """The verified radially invariant groups of ``model``, one entry per module. Plain PyTorch.

    Runs one forward pass in training mode on ``example_input`` (a tensor, a tuple of positional
    arguments or a dict of keyword arguments) and one backward pass of a fixed random projection of
    the outputs, then leaves the model exactly as it found it: weights, gradients, buffers (BatchNorm
    running statistics), train/eval modes and the global random state.

    Example::

        groups = find_invariant_groups(model, torch.randn(8, 3, 32, 32))
        print(summarize(groups, model, groups.rejected))
        tracker = SphereTracker(groups, [optimizer])

    Candidates whose gradient is not orthogonal to their weights (max ``|cos(g, x)|`` above
    ``tolerance``) are dropped with a warning.
    """
    finder = GroupFinder(model, tolerance)
    modes = {module: module.training for module in model.modules()}
    buffers = {buffer: buffer.clone() for buffer in model.buffers()}
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            model.train()
            finder.start()
            try:
                outputs = _call(model, example_input)
            finally:
                finder.stop()
            roots = [t for t in _tensors(outputs) if t.requires_grad and t.is_floating_point()]
            finder.analyze(roots)
            params = [p for entry in finder.pending for p in entry.params]
            if params:
                torch.manual_seed(0)
                projection = sum((t * torch.randn_like(t)).sum() for t in roots)
                grads = torch.autograd.grad(projection, params, allow_unused=True)
                rejected = finder.verify({p: g for p, g in zip(params, grads, strict=True) if g is not None})
                for entry in rejected:
                    warnings.warn(
                        f"{entry.module_name}: {finder.rejected[entry.module_name]}; not tracked", stacklevel=2
                    )
    finally:
        for module, training in modes.items():
            module.train(training)
        with torch.no_grad():
            for buffer, saved in buffers.items():
                buffer.copy_(saved)
    finder.reject(finder.pending, "no gradient on the example input to verify it with")
    return FoundGroups(finder.accepted, finder.rejected)


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
