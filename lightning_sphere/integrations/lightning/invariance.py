"""Measurement only: the tracked modules whose radial invariance does not hold on some steps, told once and listed in
the summary.

With the spherical correction on, the tracker itself stops correcting a module most of whose groups show a
radial gradient (its own rule). Without it nothing in training changes, so the user is told what the metrics
then describe: a normalization in eval mode (it normalizes with running statistics), a gradient turned radial (a
path around the norm, an L2 term on the weight), or steps made radial by clipping the gradient by value.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_sphere.core.groups import InvariantGroups
from lightning_sphere.core.names import get_submodule
from lightning_sphere.core.tolerance import tolerance_for
from lightning_sphere.integrations.lightning.framework import Framework
from lightning_sphere.tracking.tracker import Measurement


class InvarianceWatch:
    """The tracked modules whose invariance was lost later, with why.

    ``lost``: while it is lost (and for good after a radial gradient); ``was_lost``: once it held only for a while;
    ``clipped``: modules whose gradient turned radial under clipping by value; ``eval_steps``: the spans of steps
    on which each tracked module's normalization was in eval mode. Kept for a fit, so that the summary sums them up
    at its end.
    """

    def __init__(self, framework: Framework) -> None:
        self._framework = framework
        self.lost: dict[str, str] = {}
        self.was_lost: dict[str, str] = {}
        self.clipped: dict[str, str] = {}
        #: per module, its eval-mode spans [first step, last step], the last ``None`` while it lasts
        self.eval_steps: dict[str, list[list[int | None]]] = {}
        #: the tracked modules' normalizations that keep running statistics: (module, norm name, norm)
        self.norms: list[tuple[str, str, nn.Module]] = []
        self._model: nn.Module | None = None
        #: the Trainer's clipping by value, as the user wrote it (``None`` for none, or clipping by norm)
        self.value_clipping: str | None = None

    def restart(self) -> None:
        """A new fit: what the last one saw (its model's normalizations, what it lost) is not this one's."""
        self.lost, self.was_lost, self.clipped, self.eval_steps, self.norms = {}, {}, {}, {}, []

    def read_clipping(self, trainer: Any) -> None:
        """Note the Trainer's gradient clipping: by value, it gives a tangent gradient a radial part."""
        clip, algorithm = trainer.gradient_clip_val, trainer.gradient_clip_algorithm
        algorithm = getattr(algorithm, "value", algorithm)  # Lightning's GradClipAlgorithmType, or a string
        self.value_clipping = (
            f'Trainer(gradient_clip_val={clip}, gradient_clip_algorithm="value")'
            if clip and algorithm == "value"
            else None
        )

    def watch_norms(self, groups: Iterable[InvariantGroups], model: nn.Module) -> None:
        """Follow the normalizations of ``groups`` (the tracked ones) that keep running statistics."""
        self._model = model
        self.norms = [
            (g.module_name, g.norm_name, norm)
            for g in groups
            if g.norm_name and getattr(norm := get_submodule(model, g.norm_name), "track_running_stats", False)
        ]

    def check_norms(self, step: int) -> None:
        """A tracked module is not invariant while its normalization is in eval mode; said once when that starts,
        once when it ends, and in the summary by the steps it held."""
        for name, norm_name, norm in self.norms:
            what = f"{norm_name} ({type(norm).__name__})"
            spans = self.eval_steps.setdefault(name, [])
            if not norm.training:
                if spans and spans[-1][1] is None:
                    continue  # still in eval mode
                spans.append([step, None])
                if name not in self.lost:
                    self.was_lost.pop(name, None)  # lost again: said again, and summed up when it ends
                    self._lose(name, f"{what} is in eval mode since step {step}: it normalizes with running statistics")
            elif spans and spans[-1][1] is None:
                spans[-1][1] = step - 1  # the last step it normalized with running statistics
                if self.lost.get(name, "").startswith(what):
                    del self.lost[name]
                    self.was_lost[name] = f"{what} was in eval mode on {_steps(spans)}"
                    self._framework.info(
                        f"SphereMonitor: {name} is radially invariant again: {what} is back in training mode (it was "
                        f"in eval mode on {_steps(spans)}, normalizing with running statistics)"
                    )

    def check_gradients(
        self,
        step: int,
        measurement: Measurement,
        groups: Sequence[InvariantGroups],
        tolerance: float | None,
        compute_dtype: torch.dtype | None,
    ) -> None:
        """A tracked module most of whose groups showed a radial gradient on a logging step (|cos(g, x)| above the
        gradient test's δ/√d; the correction's own rule): a path around its norm, an L2 term on it. One
        eps-dominated channel alone, whose pre-norm variance is small next to the norm's eps, does not count.
        Under clipping by value the gradient the step used is not the loss's: the verdict is on the step, and
        says so."""
        for name in measurement.radial:
            if name in self.lost or name in self.clipped:
                continue
            cos = abs(measurement.scalars.get(f"sphere/grad_cos/{name}", float("nan")))
            entry = next(g for g in groups if g.module_name == name)
            above = f"max |cos(g, x)| {cos:.2g}, above the gradient test's δ/√d = " + (
                f"{tolerance_for(entry, tolerance, compute_dtype):.2g}"
            )
            if self.value_clipping:
                self.clipped[name] = (
                    f"on the step logged at {step} most of its groups' gradients were radial after clipping ({above}):"
                    f" {self.value_clipping} clips the gradient entry by entry, which gives a tangent gradient a "
                    "radial part"
                )
                self._framework.warn(
                    f"SphereMonitor: {name}'s steps are not tangent to the sphere: {self.clipped[name]}. Its metrics "
                    "describe those steps; whether the layer itself is still invariant cannot be read off a clipped "
                    'gradient. Clipping by norm (gradient_clip_algorithm="norm") keeps steps tangent.'
                )
            else:
                why = f"most of its groups' gradients are radial on the step logged at {step} ({above})"
                self._lose(name, why + self._eps_hint(entry))

    def _eps_hint(self, entry: InvariantGroups) -> str:
        """The usual cause of a gradient that turns radial late in training, when the module's norm has an eps."""
        model = self._model
        norm = get_submodule(model, entry.norm_name) if model is not None and entry.norm_name else None
        eps = getattr(norm, "eps", None)
        if not isinstance(eps, float) or eps <= 0:
            return ""
        return (
            f"; if nothing but {entry.norm_name} follows it, the likely cause is its eps ({eps:g}): it divides by "
            "√(variance + eps), and as the weights' norm shrinks (weight decay) the variance comes down towards eps "
            "and the weights' scale counts again: a smaller eps keeps the layer invariant"
        )

    def summary_sections(self) -> str:
        """The summary's sections on modules whose invariance was lost (empty when none was)."""
        text = ""
        for heading, reasons in (
            ("invariance lost (still measured, no longer on a sphere)", self.lost),
            ("invariance lost for a while (measured off the sphere then)", self.was_lost),
            ("steps not tangent to the sphere (still measured)", self.clipped),
        ):
            if reasons:
                text += f"\n{heading}:\n" + "\n".join(f"  {name}: {why}" for name, why in reasons.items())
        return text

    def _lose(self, name: str, why: str) -> None:
        self.lost[name] = why
        self._framework.warn(
            f"SphereMonitor: {name} is not radially invariant any more: {why}. It is still measured, but its "
            "metrics no longer describe a step on the sphere."
        )


def _steps(spans: Sequence[Sequence[int | None]]) -> str:
    """Runs of steps in words: "step 3", "steps 3–5 and 9" (``spans``: ended ones, ``[first, last]``)."""
    runs = [f"{a}" if a == b else f"{a}–{b}" for a, b in spans]
    listed = runs[0] if len(runs) == 1 else ", ".join(runs[:-1]) + f" and {runs[-1]}"
    return f"step{'s' if len(runs) > 1 or spans[0][0] != spans[0][1] else ''} {listed}"
