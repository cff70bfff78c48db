"""Finding a model's radially invariant groups during training: structure from the graph, proof from the gradient.

:class:`GroupFinder` is the shared procedure: record one forward pass, read candidates off its autograd graph
(:mod:`lightning_sphere.detection.layers`), then keep only those whose gradient is orthogonal to their weights
(docs/theory.md §1). The Lightning callback feeds it the first real training step, at no extra cost;
:func:`~lightning_sphere.detection.api.find_invariant_groups` feeds it an example input, for plain PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.autograd.graph import Node

from lightning_sphere.core.groups import UNOPTIMIZED, InvariantGroups
from lightning_sphere.core.names import model_order, named_modules, position
from lightning_sphere.detection.candidates import GroupsSpec, initial_candidates
from lightning_sphere.detection.gradient_test import failure_reason, verify_with_fallback
from lightning_sphere.detection.layers import LAYERS, GraphRoot, find_candidates
from lightning_sphere.detection.parametrized import stored_weight
from lightning_sphere.detection.recorder import WATCHED, DataflowRecorder, _Call
from lightning_sphere.detection.walk import at_output

T = TypeVar("T")

#: Steps a candidate may show a gradient that cannot judge it (zero, not finite) before it is rejected.
MAX_TRIES = 50


class GroupFinder:
    """Candidates from real forward passes, verified by the gradients of real steps, for as long as training
    runs: a layer first called, or first trainable, on a later step is examined then.

    Every *watched* module (each Conv, ConvTranspose, Linear and Embedding layer, each weight-normalized tensor,
    each candidate of ``"numeric"`` or of a mapping) is at any time accepted, pending (a structural candidate
    waiting for a gradient to verify it), rejected for good (with the reason), or not seen yet; the last two
    kinds are listed with a true reason by :meth:`untracked`. A layer whose weight is computed (a
    parametrization, pruning) is watched through the tensor the optimizer steps; no weight is ever computed
    here. :attr:`accepted` and :meth:`untracked` are in model order (``named_modules()``), whatever order the
    layers were found in; names are those the user wrote, through ``torch.compile`` and Fabric wrappers
    (:mod:`lightning_sphere.core.names`).

    Args:
        model: the model whose groups to find.
        groups: ``"auto"``: layers whose output only feeds a normalization, read off the autograd graph of a
            recorded forward pass (:meth:`start`, :meth:`analyze`), and weight-normalized tensors;
            ``"numeric"``: every trainable parameter of two or more dimensions, kept per output channel if
            its gradient passes the test, else as a whole if that passes; or a mapping from module or
            parameter names to ``"channel"``, ``"layer"`` or a number of channels per group.
        tolerance: δ of the gradient test: a module is tracked while ``max |cos(g, x)|`` over its groups is at
            most δ/√d, a share of what a random direction shows
            (:func:`~lightning_sphere.core.tolerance.tolerance_for`);
            ``None``: 0.1 for candidates the structure vouches for, 0.01 for numeric ones.
        compute_dtype: the dtype gradients are computed in under mixed precision, if 16-bit: the
            threshold is at least a few of its ulps (:func:`~lightning_sphere.core.tolerance.noise_floor`).
        max_tries: steps a candidate may show a gradient that cannot judge it (zero or not finite: AMP skips
            the first few) before it is rejected. Steps without any gradient for it do not count.

    Raises:
        ValueError: for a mapping that names what the model does not have, or a granularity it cannot take.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: GroupsSpec = "auto",
        tolerance: float | None = None,
        compute_dtype: torch.dtype | None = None,
        max_tries: int = MAX_TRIES,
    ) -> None:
        self.model = model
        self.tolerance = tolerance
        self.compute_dtype = compute_dtype
        self.max_tries = max_tries
        self.accepted: list[InvariantGroups] = []
        #: Modules left out for good, with the reason.
        self.rejected: dict[str, str] = {}
        #: The gradient test's verdicts, by :func:`verdict_key`: the cosine of accepted candidates, the reason
        #: of rejected ones (what a checkpoint keeps, :meth:`restore`).
        self.verdicts: dict[str, float | str] = {}
        self._recorder: DataflowRecorder | None = None
        #: Modules called during a recorded step whose output reached no analyzed backward pass (reset by
        #: :meth:`reexamine`): not recorded again until then.
        self._unused: dict[str, str] = {}
        self._tries: dict[str, int] = {}
        self.auto = groups == "auto"
        # Frozen tensors are candidates too: they wait, listed as frozen, until they train (and get a gradient).
        # _fallback: the coarser candidate to try when a finer one fails its test (numeric: per channel, then whole).
        self.pending, self._fallback, shared = initial_candidates(model, groups)
        self.rejected.update(shared)  # the second owner of a tied weight: the test is its first owner's
        self.analyzed = not self.auto  # "auto" reads its other candidates off a graph first
        #: Module name → the parameters whose trainability decides whether it can be examined.
        self.watched, self._weight_normed = _watched(model, self.pending, self.auto)
        self._layers = {name: m for name, m in named_modules(model) if name in self.watched}

    @property
    def done(self) -> bool:
        """Whether every candidate is decided (for ``"auto"``, once a graph was analyzed)."""
        return self.analyzed and not self.pending

    def decided(self) -> set[str]:
        return {g.module_name for g in self.accepted} | set(self.rejected) | {g.module_name for g in self.pending}

    def unseen_layers(self) -> list[nn.Module]:
        """Layers whose structure is not known yet, trainable, and not found unused: what to record."""
        if not self.auto:
            return []
        decided = self.decided()
        return [
            m
            for name, m in self._layers.items()
            if name not in decided and name not in self._unused and self.watched[name][0].requires_grad
        ]

    def start(self, layers: Collection[nn.Module] | None = None) -> None:
        """Record the calls of ``layers`` (default: :meth:`unseen_layers`) and of every normalization in the
        forward passes that follow, until :meth:`stop`; forget what an earlier recording kept."""
        self.stop()
        self._recorder = DataflowRecorder(self.model, self.unseen_layers() if layers is None else layers).__enter__()

    def stop(self) -> None:
        """Stop recording; what was recorded stays available to :meth:`analyze`."""
        if self._recorder is not None:
            self._recorder.__exit__()

    def finish(self) -> None:
        """Stop recording and drop what was recorded (the end of a step): a trainable layer called during it
        whose output reached none of its analyzed backward passes is not recorded again until
        :meth:`reexamine`."""
        self.stop()
        if self._recorder is not None:
            decided = self.decided()
            for call in self._recorder.calls:
                if call.name in self.watched and call.name not in decided:
                    self._unused.setdefault(call.name, _NO_GRAPH if call.output is None else _NO_BACKWARD)
            self._recorder = None

    def has_blind_calls(self) -> bool:
        """Whether the recording holds a layer call made without a graph (``torch.no_grad``, or the forward of a
        reentrant checkpoint, which the backward pass recomputes with one: :meth:`analyze_recomputed`)."""
        return self._recorder is not None and any(
            isinstance(c.module, LAYERS) and c.output is None for c in self._recorder.calls
        )

    def has_layer_calls(self) -> bool:
        """Whether the recording holds a call of a layer not analyzed yet."""
        return self._recorder is not None and any(isinstance(c.module, WATCHED) for c in self._recorder.calls)

    def analyze(self, roots: Sequence[GraphRoot]) -> None:
        """Read candidates off the graph that produced ``roots`` (its nodes must still be alive).

        May be called after every backward pass of a step: each analyzes the recorded layer calls its graph
        holds, and keeps the others for the next. A module already decided keeps its decision; one found
        invalid in any analyzed graph is rejected. A frozen layer is not decided: it is examined again once
        trainable (:meth:`reexamine`).
        """
        if self._recorder is None:
            raise RuntimeError("GroupFinder.analyze() needs a recorded forward pass: call start() first")
        first, self.analyzed = not self.analyzed, True
        calls = self._recorder.calls
        if not first and not any(isinstance(c.module, WATCHED) for c in calls):
            return  # nothing new to learn from this graph: no walk (the first may hold weights used by no call)
        known = self.decided()
        undecided = [name for name in self.watched if name not in known]
        biases = self._recorder.biases.values
        found = find_candidates(calls, roots, self.model, exclude=self._weight_normed, uses=undecided, biases=biases)
        final = {name: reason for name, reason in found.rejected.items() if "frozen" not in reason}
        decided = {g.module_name for g in self.accepted} | set(self.rejected)
        for name, reason in final.items():
            if name not in decided:
                self.rejected[name] = reason
        self.pending = [g for g in self.pending if g.module_name not in self.rejected]
        known = self.decided()
        self.pending += [g for g in found.groups if g.module_name not in known]
        seen = set(final) | {g.module_name for g in found.groups}
        # Normalization calls stay: a later backward of this step may reach them through another layer.
        calls[:] = [c for c in calls if not isinstance(c.module, LAYERS) or c.name not in seen]

    def analyze_outputs(self) -> None:
        """Analyze with the recorded calls' own outputs as roots, for a backward pass that was not seen
        (``loss.backward()`` in manual optimization): the graph of everything up to the last recorded module.
        A use of a layer's output that bypasses every recorded module is invisible here; the gradient test
        that follows still catches what it breaks."""
        if self._recorder is not None:
            self.analyze(_terminal_roots(self._recorder.calls))

    def analyze_recomputed(self) -> bool:
        """Read the layers that ran without a graph and then again with one (the forward of
        ``torch.utils.checkpoint(use_reentrant=True)``, recomputed during the backward pass) off the recomputed
        graph, up to the recorded modules' outputs. Only candidates are taken from it (what leaves the
        checkpointed segment is not in it): the gradient test decides. Returns whether there were any."""
        if self._recorder is None:
            return False
        calls = self._recorder.calls
        blind = {c.name for c in calls if c.output is None} & {c.name for c in calls if c.output is not None}
        blind -= self.decided()
        if not blind:
            return False
        chosen = [c for c in calls if not isinstance(c.module, LAYERS) or (c.name in blind and c.output is not None)]
        roots = _terminal_roots(chosen)
        found = find_candidates(chosen, roots, self.model, exclude=self._weight_normed)
        self.pending += [g for g in found.groups if g.module_name in blind]
        candidates = {g.module_name for g in found.groups}
        for name in sorted(blind - candidates):
            why = found.rejected.get(name, "")
            # Inside the segment the graph tells; where the output leaves it, the graph ends: say so.
            ends = tuple(at_output(end).removeprefix("output reaches ") for end in ("the loss", "the model's output"))
            self._unused[name] = why if why and not why.endswith(ends) else _CHECKPOINTED
        calls[:] = [c for c in calls if c.name not in blind]
        return True

    def reexamine(self) -> None:
        """The set of trainable, stepped parameters changed: examine again the layers found unused."""
        self._unused.clear()

    def eligible(self, entry: InvariantGroups, stepped: Collection[Tensor] | None = None) -> bool:
        """Whether every parameter of ``entry`` is in ``stepped`` (the trainable parameters some optimizer
        steps), or, without it, trainable."""
        return all(p.requires_grad if stepped is None else p in stepped for p in entry.params)

    def untracked(self, stepped: Collection[Tensor] | None = None, tracked: Collection[str] = ()) -> dict[str, str]:
        """Module name → why it is not tracked now, for every watched module not in ``tracked``.

        ``stepped``: the parameters some optimizer steps (``None``: not asked, as for plain PyTorch).
        """
        return _untracked(self, stepped, tracked)

    def verify(
        self, grads: Mapping[nn.Parameter, Tensor], entries: Sequence[InvariantGroups] | None = None
    ) -> list[InvariantGroups]:
        """Decide the pending candidates (``entries`` of them, if given) whose gradients are in ``grads``;
        return those rejected.

        One device-to-host transfer (two when coarser fallbacks are tried), none when no candidate has a
        gradient. Candidates without a usable gradient stay pending; after ``max_tries`` steps with an
        unusable one they are rejected.
        """
        chosen = self.pending if entries is None else [e for e in self.pending if e in entries]
        if not any(all(p in grads for p in e.params) for e in chosen):
            return []
        others = [e for e in self.pending if e not in chosen]
        accepted, rejected, waiting = verify_with_fallback(
            chosen, grads, self._fallback, self.tolerance, self.compute_dtype
        )
        self.accepted[:] = _in_model_order(self.model, self.accepted + accepted, _module_name)
        for e in accepted:
            assert e.cosine is not None  # verify_with_fallback measured every candidate it accepts
            self.verdicts[verdict_key(e)] = e.cosine
        for entry in rejected:
            why = failure_reason(entry, self.model, self.tolerance, self.compute_dtype)
            self.rejected[entry.module_name] = self.verdicts[verdict_key(entry)] = why
        self.pending = others + waiting
        for entry in waiting:
            if all(p in grads for p in entry.params):
                self._tries[entry.module_name] = self._tries.get(entry.module_name, 0) + 1
                if self._tries[entry.module_name] >= self.max_tries:
                    self.reject([entry], f"no usable gradient to verify it in {self.max_tries} steps")
        return rejected

    @property
    def retrying(self) -> bool:
        """Whether a pending candidate has shown a gradient that could not judge it (it will be tried again)."""
        names = {g.module_name for g in self.pending}
        return any(name in names for name in self._tries)

    def restore(self, verdicts: Mapping[str, float | str]) -> None:
        """Decide pending candidates as an earlier run did (:func:`verdict_key` → cosine, or → reason), so that
        a resumed run tracks the same groups without testing them again. Only the identical candidate (module,
        parameters, granularity) reuses a verdict: anything else is verified afresh."""
        keep = []
        for entry in self.pending:
            verdict = verdicts.get(verdict_key(entry))
            if isinstance(verdict, str):
                self.rejected[entry.module_name] = verdict
            elif verdict is not None:
                self.accepted.append(replace(entry, cosine=float(verdict)))
            else:
                keep.append(entry)
                continue
            self.verdicts[verdict_key(entry)] = verdict
            self._fallback.pop(entry.module_name, None)
        self.pending = keep
        self.accepted[:] = _in_model_order(self.model, self.accepted, _module_name)

    def reject(self, entries: Sequence[InvariantGroups], why: str) -> None:
        """Reject pending candidates without a verdict from their gradient, with the reason ``why``."""
        for entry in entries:
            self.rejected[entry.module_name] = why
        self.pending = [entry for entry in self.pending if entry not in entries]


_NO_BACKWARD = "called, but its output reached no backward pass"


_CHECKPOINTED = (
    "inside torch.utils.checkpoint(use_reentrant=True), and its output leaves the checkpointed part, past which "
    "the recomputed graph cannot be read: use use_reentrant=False"
)


_NO_GRAPH = (
    "called with gradients off (torch.no_grad, or inside torch.utils.checkpoint(use_reentrant=True), whose "
    "graph cannot be read: use use_reentrant=False)"
)


def _untracked(finder: GroupFinder, stepped: Collection[Tensor] | None, tracked: Collection[str]) -> dict[str, str]:
    """:meth:`GroupFinder.untracked`: the state of every watched module, as the reason it is not tracked."""
    out: dict[str, str] = {}
    accepted = {g.module_name: g.params for g in finder.accepted}
    pending = {g.module_name: g.params for g in finder.pending}
    watched = [*finder.watched, *finder.rejected, *pending, *accepted]
    for name in _in_model_order(finder.model, dict.fromkeys(watched), lambda name: name):
        if name in tracked:
            continue
        params = accepted.get(name) or pending.get(name) or finder.watched.get(name, ())
        if name in finder.rejected:
            out[name] = finder.rejected[name]
        elif not all(p.requires_grad for p in params):
            out[name] = "weight is frozen"
        elif stepped is not None and not all(p in stepped for p in params):
            out[name] = UNOPTIMIZED
        elif name in pending:
            out[name] = "waiting for a gradient to verify it"
        elif name in accepted:
            out[name] = "verified, tracked from its next step"
        elif name in finder._unused:
            out[name] = finder._unused[name]
        else:
            out[name] = "not called yet"
    return out


def _in_model_order(model: nn.Module, items: Iterable[T], module_name: Callable[[T], str]) -> list[T]:
    """``items`` in the order of their modules in ``model`` (``named_modules()``), whatever order they came in."""
    order = model_order(model)
    return sorted(items, key=lambda item: position(order, module_name(item)))


def _module_name(entry: InvariantGroups) -> str:
    return entry.module_name


def _watched(
    model: nn.Module, declared: Sequence[InvariantGroups], auto: bool
) -> tuple[dict[str, tuple[nn.Parameter, ...]], list[nn.Module]]:
    """The modules a finder watches (module name → the parameters whose trainability decides whether it can be
    examined): those of the ``declared`` candidates and, with ``auto``, every layer with a stored weight; and the
    modules that own a declared parameter (weight-normalized ones), which the graph leaves alone."""
    params = {p for g in declared for p in g.params}
    owners = [m for m in model.modules() if any(p in params for p in m.parameters())]
    watched: dict[str, tuple[nn.Parameter, ...]] = {g.module_name: g.params for g in declared}
    if auto:
        for name, module in named_modules(model):
            stored = stored_weight(module) if isinstance(module, WATCHED) else None
            if stored is not None and module not in owners:
                watched.setdefault(name, stored.params)
    return watched, owners


def verdict_key(entry: InvariantGroups) -> str:
    """What identifies a candidate across runs: its module, parameters and granularity."""
    params = ",".join(f"{s.name}{list(s.channel_dims)}" for s in entry.slices)
    return f"{entry.module_name}|{params}|{entry.granularity}|{entry.num_groups}"


def _terminal_roots(calls: Sequence[_Call]) -> list[_Root]:
    """The outputs of the recorded calls that no other recorded call takes in: where a walk from a layer may
    end (a layer's own output, or its activation's, is on the way, not a use of it)."""
    inputs = {c.input for c in calls if c.input is not None}
    return [_Root(c.output) for c in calls if c.output is not None and c.output not in inputs]


@dataclass(frozen=True)
class _Root:
    """A graph root given by its node (what :func:`find_candidates` reads of a root tensor)."""

    grad_fn: Node
