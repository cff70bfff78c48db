"""Reading the TensorBoard event files that :class:`~lightning_sphere.SphereMonitor` writes: every run under a log
directory (:func:`find_runs`, :func:`read_runs`), each as its scalars (:class:`Series`) and histograms
(:class:`Histograms`) by tag (:class:`Run`); what they logged (:func:`metrics_of`, :func:`layers_of`,
:func:`scheduled_lr_tags`); and the settling time (§7.2) their logged hyper-parameters give
(:func:`settling_steps`). The figures are drawn from these by :mod:`lightning_sphere.reporting.plot`.

Read with TensorBoard's own event reader (``tensorboard`` is a dependency of the package); matplotlib is not
needed here, only to draw.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lightning_sphere.measurement.metrics import METRICS, SKIPPED_GROUPS

#: The metric that holds the §7 equilibrium of ``angular_update``: drawn in its figure, and the sign that an
#: ``Adam`` run decayed its weights decoupled (see :func:`settling_steps`).
EQUILIBRIUM = "angular_update_equilibrium"


#: The tags a ``LearningRateMonitor`` logs: ``lr-<Optimizer>``, ``lr-<Optimizer>/pg1``, …, and with the
#: suffixes below its momentum and weight decay.
_LR_TAG = re.compile(r"^lr-.+")


_LR_SUFFIXES = ("-momentum", "-weight_decay")


@dataclass
class Series:
    """One scalar tag of one run: ``steps`` (int64) and ``values`` (float64), both ``(n,)``, by step."""

    steps: np.ndarray
    values: np.ndarray


@dataclass
class Histograms:
    """One histogram tag of one run, one entry per logged step: the bucket edges ``(k + 1,)`` (the lowest
    is the minimum value) and counts ``(k,)`` as TensorBoard stored them."""

    steps: list[int] = field(default_factory=list)
    edges: list[np.ndarray] = field(default_factory=list)
    counts: list[np.ndarray] = field(default_factory=list)


@dataclass
class Run:
    """What one run directory logged."""

    name: str
    path: Path
    scalars: dict[str, Series]
    histograms: dict[str, Histograms]


def find_runs(logdir: str | Path) -> list[Path]:
    """The directories under ``logdir`` (itself included) that hold TensorBoard event files, sorted.

    Raises:
        FileNotFoundError: ``logdir`` is not a directory.
        ValueError: no event file (``*tfevents*``) under it; the message lists what is there.
    """
    from tensorboard.backend.event_processing import io_wrapper

    root = Path(logdir)
    if not root.is_dir():
        raise FileNotFoundError(f"{str(root)!r} is not a directory; give the log directory of a TensorBoard logger")
    runs = sorted(Path(path) for path in io_wrapper.GetLogdirSubdirectories(str(root)))
    if not runs:
        found = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        listing = ", ".join(found[:10]) + (f" and {len(found) - 10} more" if len(found) > 10 else "")
        raise ValueError(
            f"no TensorBoard event files (events.out.tfevents.*) under {str(root)!r}; "
            f"it holds {listing or 'nothing'}. Point at the directory a TensorBoardLogger wrote to"
        )
    return runs


def _run_name(root: Path, path: Path) -> str:
    relative = path.relative_to(root).as_posix()
    return root.resolve().name if relative == "." else relative


def read_run(root: str | Path, path: str | Path) -> Run:
    """Every scalar and histogram of one run directory, read with TensorBoard's ``EventAccumulator``
    (all events kept, none sampled); a step logged twice (a resumed run) keeps its last value."""
    from tensorboard.backend.event_processing import event_accumulator

    path = Path(path)
    accumulator = event_accumulator.EventAccumulator(
        str(path), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.HISTOGRAMS: 0}
    )
    accumulator.Reload()
    tags = accumulator.Tags()
    scalars = {}
    for tag in tags.get(event_accumulator.SCALARS, []):
        by_step = {event.step: event.value for event in accumulator.Scalars(tag)}
        steps = np.array(sorted(by_step), dtype=np.int64)
        scalars[tag] = Series(steps, np.array([by_step[s] for s in steps.tolist()], dtype=np.float64))
    histograms = {}
    for tag in tags.get(event_accumulator.HISTOGRAMS, []):
        by_step = {event.step: event.histogram_value for event in accumulator.Histograms(tag)}
        series = Histograms()
        for step in sorted(by_step):
            value = by_step[step]
            limits = np.array(value.bucket_limit, dtype=np.float64)
            counts = np.array(value.bucket, dtype=np.float64)
            if counts.size == 0:
                continue
            edges = np.concatenate([[value.min], np.clip(limits, value.min, value.max)])
            series.steps.append(step)
            series.edges.append(edges)
            series.counts.append(counts)
        histograms[tag] = series
    prefix = _logger_prefix([*scalars, *histograms])
    if prefix:  # a Lightning logger's `prefix`: the tags as the monitor named them
        scalars = {tag.removeprefix(prefix): series for tag, series in scalars.items()}
        histograms = {tag.removeprefix(prefix): series for tag, series in histograms.items()}
    return Run(_run_name(Path(root), path), path, scalars, histograms)


def _logger_prefix(tags: list[str]) -> str:
    """What a Lightning logger with a ``prefix`` put before every key (``"x-"`` for ``prefix="x"``), when the
    run's sphere metrics carry one; else ``""``."""
    if any(tag.startswith("sphere/") for tag in tags):
        return ""
    found = {m.group(1) for tag in tags if (m := re.match(r"(.+?-)sphere/", tag))}
    return found.pop() if len(found) == 1 else ""


def read_runs(logdir: str | Path, progress: bool = True) -> dict[str, Run]:
    """Every run under ``logdir`` that logged ``sphere/`` metrics, by name (its path relative to
    ``logdir``), with a tqdm progress bar on stderr when there are several; a warning names the runs left
    out for having none.

    Raises:
        FileNotFoundError, ValueError: see :func:`find_runs`; also ``ValueError`` when no run has a
            ``sphere/`` scalar, naming the runs and some of the tags they have.
    """
    from tqdm.auto import tqdm

    root = Path(logdir)
    paths = find_runs(root)
    runs = [
        read_run(root, path)
        for path in tqdm(paths, desc="reading runs", unit="run", disable=not progress or len(paths) < 2)
    ]
    kept = {run.name: run for run in runs if any(tag.startswith("sphere/") for tag in run.scalars)}
    if kept and len(kept) < len(runs):
        skipped = ", ".join(run.name for run in runs if run.name not in kept)
        warnings.warn(f"left out the runs under {str(root)!r} with no `sphere/` metrics: {skipped}", stacklevel=2)
    if not kept:
        tags = sorted({tag for run in runs for tag in (*run.scalars, *run.histograms)})
        shown = ", ".join(tags[:12]) + (f" and {len(tags) - 12} more" if len(tags) > 12 else "")
        names = ", ".join(run.name for run in runs)
        raise ValueError(
            f"none of the {len(runs)} runs under {str(root)!r} ({names}) logged `sphere/` metrics; "
            f"their tags: {shown or 'none'}. Log with lightning_sphere.SphereMonitor and a TensorBoardLogger"
        )
    return kept


def metrics_of(runs: dict[str, Run]) -> list[str]:
    """The metrics with a ``sphere/`` scalar in any run, in the registry's order (unknown ones last, sorted)."""
    found = {tag.split("/")[1] for run in runs.values() for tag in run.scalars if tag.startswith("sphere/")}
    order = [*METRICS, SKIPPED_GROUPS]
    return [m for m in order if m in found] + sorted(found - set(order))


def layers_of(runs: dict[str, Run], metric: str, prefix: str = "sphere") -> list[str]:
    """The layers (module names, and ``"all"``) any run logged ``metric`` for: ``"all"`` first, then sorted."""
    start = f"{prefix}/{metric}/"
    found = {
        tag[len(start) :] for run in runs.values() for tag in (*run.scalars, *run.histograms) if tag.startswith(start)
    }
    return sorted(found, key=lambda name: (name != "all", name))


def scheduled_lr_tags(run: Run) -> list[str]:
    """The learning-rate tags of a ``LearningRateMonitor`` in ``run`` (not its momentum or weight decay)."""
    return sorted(t for t in run.scalars if _LR_TAG.match(t) and not t.endswith(_LR_SUFFIXES))


def settling_times(run: Run) -> dict[str, float]:
    """The settling times, in steps, of the param groups whose hyper-parameters the run logged (§7.2): the
    norm shrinks by about ηλ per step under AdamW, SGD and torch's Muon (§8.2), so 1/(2ηλ); by ηλ/(1 − μ) under SGD
    with momentum, whose buffer accumulates the decay, so (1 − μ)/(2ηλ) (no dampening assumed). Read from a
    ``LearningRateMonitor(log_momentum=True, log_weight_decay=True)``'s tags ``lr-<Optimizer>[/pgN]``,
    ``…-weight_decay`` and ``…-momentum`` (at the first step with a positive lr: a warm-up from 0 is skipped).
    ``Adam`` counts as AdamW when the run logged an equilibrium (``Adam(decoupled_weight_decay=True)``; with L2
    decay there is none). Dampening is not logged and taken as 0 (with dampening τ the time is 1/(1 − τ) times
    longer). None for other optimizers, where the logged η and λ do not give the decay per step (Prodigy's
    learning rate is d·η; lion-pytorch's λ means ηλ per step, or λ with ``decoupled_weight_decay=True``, which no
    tag says), λ = 0, or SGD whose momentum was not logged. Keyed by the param group's
    tag less ``lr-`` (``"AdamW"``, ``"Muon/pg1"``): a run with two optimizers, Muon for the matrices and AdamW for
    the rest, gets both, and which steps the tracked layers is the user's to read."""
    decoupled_adam = any(tag.startswith(f"sphere/{EQUILIBRIUM}/") for tag in run.scalars)
    times: dict[str, float] = {}
    for tag in scheduled_lr_tags(run):
        decay = run.scalars.get(f"{tag}-weight_decay")
        optimizer = tag.removeprefix("lr-").split("/")[0]
        if optimizer == "Adam" and decoupled_adam:
            optimizer = "AdamW"
        if decay is None or optimizer not in ("SGD", "AdamW", "Muon"):
            continue
        momentum = run.scalars.get(f"{tag}-momentum") if optimizer == "SGD" else None
        if optimizer == "SGD" and momentum is None:
            continue
        lr = run.scalars[tag]
        positive = np.flatnonzero(lr.values > 0)
        if not positive.size:
            continue
        step = lr.steps[positive[0]]
        eta_lambda = lr.values[positive[0]] * _at(decay, step)
        if eta_lambda > 0:
            mu = _at(momentum, step) if momentum is not None else 0.0
            times[tag.removeprefix("lr-")] = float((1 - mu) / (2 * eta_lambda))
    return times


def settling_steps(run: Run) -> list[float]:
    """The distinct values of :func:`settling_times`, sorted."""
    return sorted(set(settling_times(run).values()))


def _at(series: Series, step: int) -> float:
    """The value logged at ``step``, else the last one before it (else the first)."""
    index = max(int(np.searchsorted(series.steps, step, side="right")) - 1, 0)
    return float(series.values[index])
