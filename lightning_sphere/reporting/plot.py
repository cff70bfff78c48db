"""Figures from the TensorBoard event files that :class:`~lightning_sphere.SphereMonitor` writes.

``lightning-sphere plot LOGDIR -o OUTDIR`` (or :func:`plot`) reads every run under ``LOGDIR`` with
TensorBoard's own event reader (:mod:`lightning_sphere.reporting.runs`, whose names this module re-exports) and
writes one PNG per metric, every run a colour, every layer a panel:

- every ``sphere/<metric>/<module>`` and ``sphere/<metric>/all`` scalar that is present (which keys a run
  logged depends on the monitor's settings: nothing here assumes a per-layer key exists);
- ``effective_lr`` with a panel of the scheduled learning rate when a ``LearningRateMonitor`` logged it
  (tags ``lr-<Optimizer>``, ``lr-<Optimizer>/pg1``, …);
- ``angular_update`` with the §7 equilibrium (``angular_update_equilibrium``, the layer's own key when
  logged, else ``/all``) dashed, and the predicted settling time (§7.2) as a dotted vertical line;
- one heat map per histogrammed metric (``sphere_hist/<metric>/<module>``): steps across, the metric's
  value up, the fraction of the layer's groups in each bin as colour;

and an ``index.md`` listing them. File names depend only on the metric: ``<metric>.png``,
``hist_<metric>.png``.

The settling time needs η and λ, and for SGD the momentum μ, which the monitor does not log: it is marked
when the run also logged them, as ``LearningRateMonitor(log_momentum=True, log_weight_decay=True)`` does
(``lr-SGD``, ``lr-SGD-weight_decay``, ``lr-SGD-momentum``), from their first logged values: 1/(2ηλ) steps
for AdamW and (1 − μ)/(2ηλ) for SGD (see :func:`settling_steps`). The equilibrium alone does not give ηλ:
θ*² = 2ηλ/(1+μ) for SGD-M needs μ, and AdamW's needs β1, so without them no line is drawn (the panel says
so).

matplotlib is imported only here, behind the ``plot`` extra: ``pip install -e ".[plot]"`` from a clone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_sphere.measurement.metrics import METRICS, SKIPPED_GROUPS
from lightning_sphere.reporting.runs import (
    EQUILIBRIUM,
    Histograms,
    Run,
    Series,
    find_runs,
    layers_of,
    metrics_of,
    read_run,
    read_runs,
    scheduled_lr_tags,
    settling_steps,
    settling_times,
)

if TYPE_CHECKING:
    from matplotlib.typing import LineStyleType  # the plot extra's: imported at run time by the drawing functions

#: What this module offers: the figures, and (from :mod:`~lightning_sphere.reporting.runs`) the runs they read.
__all__ = [
    "COLUMNS",
    "DPI",
    "EQUILIBRIUM",
    "HISTOGRAM_BINS",
    "LOG_SCALE",
    "PANEL_INCHES",
    "SETTLING_BEYOND",
    "Histograms",
    "Run",
    "Series",
    "find_runs",
    "histogram_figure",
    "histogram_matrix",
    "layers_of",
    "metric_figure",
    "metrics_of",
    "plot",
    "read_run",
    "read_runs",
    "scheduled_lr_tags",
    "settling_steps",
    "settling_times",
]

#: Pixels per inch of every figure, and the size of one panel in inches: a figure of ``n`` panels is
#: ``min(n, COLUMNS)`` panels wide and ``ceil(n / COLUMNS)`` high.
DPI = 100


PANEL_INCHES = (4.0, 3.0)


COLUMNS = 3


#: Metrics drawn on a logarithmic axis: positive and spanning orders of magnitude over a run.
LOG_SCALE = ("norm", "angular_update", "effective_lr", "sphere_grad_norm")


#: A settling time beyond this many times the run's last step is written in the panel instead of drawn.
SETTLING_BEYOND = 1.5


HISTOGRAM_BINS = 40


def _matplotlib() -> Any:
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            'lightning-sphere plot needs matplotlib: pip install -e ".[plot]" from a clone of the repository '
            '(or pip install "matplotlib>=3.7")'
        ) from err
    del matplotlib
    return Figure


def _figure(panels: int) -> tuple[Any, list[Any]]:
    figure_class = _matplotlib()
    columns = min(panels, COLUMNS)
    rows = math.ceil(panels / columns)
    figure = figure_class(figsize=(PANEL_INCHES[0] * columns, PANEL_INCHES[1] * rows), dpi=DPI, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for extra in axes[panels:]:
        extra.set_visible(False)
    return figure, axes[:panels]


def _colours(runs: Iterable[str]) -> dict[str, Any]:
    import matplotlib

    names = list(runs)
    palette = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: palette(i % palette.N) for i, name in enumerate(names)}


def _unit(metric: str) -> str:
    return METRICS[metric].unit if metric in METRICS else ("count" if metric == SKIPPED_GROUPS else "")


def _legend(figure: Any, colours: dict[str, Any], styles: Sequence[tuple[LineStyleType, str]] = ()) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, label=name) for name, c in colours.items()]
    handles += [Line2D([], [], color="0.3", linestyle=style, label=label) for style, label in styles]
    per_row = 4 if figure.get_figwidth() >= 8 else 2  # a one-panel figure: two entries a row, none cut
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), per_row), fontsize="small")


def metric_figure(runs: dict[str, Run], metric: str, layers: Sequence[str] | None = None) -> Any:
    """The figure of one metric: a panel per layer (``"all"`` first), every run a colour.

    Each plotted series is a ``Line2D`` whose gid is ``"<run>|<tag>"`` and whose data are the logged steps and
    values, so the figure can be checked against the event files. ``angular_update`` adds, per run, the
    equilibrium (dashed) and the settling time (dotted vertical); ``effective_lr`` a last panel with the
    scheduled learning rate when it was logged.

    Args:
        runs: from :func:`read_runs`.
        metric: a metric name as in ``sphere/<metric>/...``.
        layers: only these layers (module names or ``"all"``); default every layer logged.

    Raises:
        ValueError: no run logged ``metric`` (for the layers asked).
    """
    names = [layer for layer in layers_of(runs, metric) if layers is None or layer in layers]
    if not names:
        raise ValueError(
            f"no run logged sphere/{metric}/"
            + ("<layer>" if layers is None else f"{{{', '.join(layers)}}}")
            + f"; metrics found: {', '.join(metrics_of(runs))}"
        )
    lr_panel = metric == "effective_lr" and any(scheduled_lr_tags(run) for run in runs.values())
    figure, axes = _figure(len(names) + lr_panel)
    colours = _colours(runs)
    styles: list[tuple[LineStyleType, str]] = []
    for ax, layer in zip(axes, names, strict=False):
        notes: dict[str, list[str]] = {}  # note → the runs it is about
        for run in runs.values():
            tag = f"sphere/{metric}/{layer}"
            if tag in run.scalars:
                series = run.scalars[tag]
                marker = "o" if series.steps.size < 2 else None  # a lone point is invisible as a line
                ax.plot(series.steps, series.values, color=colours[run.name], marker=marker, gid=f"{run.name}|{tag}",
                        label=run.name)  # fmt: skip
            if metric == "angular_update":
                for note in _draw_equilibrium(ax, run, layer, colours[run.name], styles):
                    notes.setdefault(note, []).append(run.name)
        ax.set_title(f"{metric} · {layer}", fontsize="medium")
        ax.set_xlabel("step")
        ax.set_ylabel(_unit(metric))
        if metric in LOG_SCALE:
            ax.set_yscale("log")
        if notes and ax is axes[0]:  # the same in every panel: said once
            lines = (f"{note}: {who[0] if len(who) == 1 else f'{len(who)} runs'}" for note, who in notes.items())
            text = "\n".join(lines)
            box = dict(facecolor="white", alpha=0.8, edgecolor="none", pad=1)  # readable over the lines
            ax.text(0.02, 0.02, text, transform=ax.transAxes, fontsize="x-small", va="bottom", bbox=box)
    if lr_panel:
        ax = axes[-1]
        for run in runs.values():
            for tag in scheduled_lr_tags(run):
                series = run.scalars[tag]
                ax.plot(series.steps, series.values, color=colours[run.name], gid=f"{run.name}|{tag}")
        ax.set_title("scheduled learning rate (LearningRateMonitor)", fontsize="medium")
        ax.set_xlabel("step")
        ax.set_yscale("log")
    drawn = {run.name for run in runs.values() if any(f"sphere/{metric}/{layer}" in run.scalars for layer in names)}
    _legend(figure, {name: c for name, c in colours.items() if name in drawn}, styles)  # the runs on these axes
    return figure


def _draw_equilibrium(ax: Any, run: Run, layer: str, colour: Any, styles: list[tuple[LineStyleType, str]]) -> list[str]:
    """Dashed: the layer's equilibrium (else all groups'); dotted: the settling times. Returns notes."""
    tag = f"sphere/{EQUILIBRIUM}/{layer}"
    tag = tag if tag in run.scalars else f"sphere/{EQUILIBRIUM}/all"
    if tag not in run.scalars:
        return []
    series = run.scalars[tag]
    ax.plot(series.steps, series.values, color=colour, linestyle="--", gid=f"{run.name}|{tag}")
    _style(styles, "--", "equilibrium (§7, §8)")
    if norm_held(run):  # rotational or hyperball: the line is the angle the mode imposes, and nothing settles
        return ["norm held (rotational or hyperball, §9): nothing settles"]
    notes = []
    last = max(s.steps[-1] for s in run.scalars.values() if s.steps.size)
    times = settling_times(run)
    several = len({name.split("/")[0] for name in times}) > 1  # Muon for the matrices, AdamW for the rest: say whose
    for name, steps in times.items():
        whose = f" ({name})" if several else ""
        if steps <= SETTLING_BEYOND * last:
            ax.axvline(steps, color=colour, linestyle=":", gid=f"{run.name}|settling")
            if several:
                ax.annotate(
                    name, (steps, 1), xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right",
                    fontsize="x-small", color=colour,
                )  # fmt: skip
            _style(styles, ":", "settling time (§7.2)")
        else:
            notes.append(f"settles in {steps:,.0f} steps{whose}, past the end")
    if not times:
        notes.append(_no_settling_time(run))
    return notes


def norm_held(run: Run) -> bool:
    """Whether the run's tracked groups kept their norm (``sphere/norm/all`` constant to 1e-5 over two or more logged
    steps): the rotational and hyperball modes hold it (§9), where any plain optimizer's norms grow or decay."""
    series = run.scalars.get("sphere/norm/all")
    if series is None or series.values.size < 2:
        return False
    values = series.values
    return bool(np.ptp(values) <= 1e-5 * np.abs(values).max())


def _no_settling_time(run: Run) -> str:
    """Why a run gets no settling time: what it did not log, or that its optimizers' logs do not give one."""
    tags = scheduled_lr_tags(run)
    if not tags:
        return "η, λ (μ) not logged, no settling time"
    if not any(f"{tag}-weight_decay" in run.scalars for tag in tags):
        return "λ not logged (LearningRateMonitor(log_weight_decay=True)), no settling time"
    return f"no settling time known for {', '.join(tag.removeprefix('lr-') for tag in tags)} (§7.2)"


def _style(styles: list[tuple[LineStyleType, str]], style: LineStyleType, label: str) -> None:
    if (style, label) not in styles:
        styles.append((style, label))


def histogram_matrix(hist: Histograms, edges: np.ndarray, log: bool) -> np.ndarray:
    """The fraction of groups in each bin of ``edges`` ``(b + 1,)`` at each logged step: ``(b, steps)``.

    TensorBoard keeps counts per bucket; the bucket's counts are spread uniformly over it (in log space when
    ``log``), by interpolating the cumulative count at the new edges. Columns sum to 1.
    """
    transform = np.log if log else (lambda a: a)
    columns = []
    for bucket_edges, counts in zip(hist.edges, hist.counts, strict=True):
        cumulative = np.concatenate([[0.0], np.cumsum(counts)])
        x = transform(np.maximum(bucket_edges, edges[0]) if log else bucket_edges)
        x = np.maximum.accumulate(x)  # equal edges (a bucket of one value) stay ordered
        at = np.interp(transform(edges), x, cumulative, left=0.0, right=cumulative[-1])
        if edges[-1] >= bucket_edges[-1]:  # interp may stop short at a last bucket of zero width (all at max)
            at[-1] = cumulative[-1]
        columns.append(np.diff(at) / cumulative[-1])
    return np.stack(columns, axis=1)


def histogram_figure(runs: dict[str, Run], metric: str, layers: Sequence[str] | None = None) -> Any:
    """Heat maps of ``sphere_hist/<metric>/<module>``: a row of panels per module, a column per run; x is
    the step, y the metric's value (log axis when it is positive over two orders of magnitude), colour the
    fraction of the module's groups (:func:`histogram_matrix`). Each panel's ``QuadMesh`` has gid
    ``"<run>|<tag>"``. ``layers``: only these modules (default all).

    Raises:
        ValueError: no run logged histograms of ``metric`` (for the modules asked).
    """
    modules = [m for m in layers_of(runs, metric, prefix="sphere_hist") if layers is None or m in layers]
    with_hist = [run for run in runs.values() if any(t.startswith(f"sphere_hist/{metric}/") for t in run.histograms)]
    if not modules or not with_hist:
        raise ValueError(f"no run logged histograms sphere_hist/{metric}/<module>")
    figure_class = _matplotlib()
    rows, columns = len(modules), len(with_hist)
    figure = figure_class(figsize=(PANEL_INCHES[0] * columns, PANEL_INCHES[1] * rows), dpi=DPI, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    for i, module in enumerate(modules):
        for j, run in enumerate(with_hist):
            ax = axes[i][j]
            tag = f"sphere_hist/{metric}/{module}"
            hist = run.histograms.get(tag)
            ax.set_title(f"{run.name} · {module}", fontsize="small")
            if hist is None or not hist.steps:
                ax.set_visible(False)
                continue
            low = min(float(e[0]) for e in hist.edges)
            high = max(float(e[-1]) for e in hist.edges)
            log = low > 0 and high / low > 100
            high = high if high > low else low + (abs(low) or 1.0) * 1e-6
            edges = np.geomspace(low, high, HISTOGRAM_BINS + 1) if log else np.linspace(low, high, HISTOGRAM_BINS + 1)
            matrix = histogram_matrix(hist, edges, log)
            steps = np.asarray(hist.steps, dtype=np.float64)
            centres = np.sqrt(edges[1:] * edges[:-1]) if log else (edges[1:] + edges[:-1]) / 2
            mesh = ax.pcolormesh(steps, centres, matrix, shading="nearest", cmap="magma", gid=f"{run.name}|{tag}")
            if log:
                ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_ylabel(f"{metric} ({_unit(metric)})", fontsize="small")
            figure.colorbar(mesh, ax=ax, label="fraction of groups")
    return figure


def plot(
    logdir: str | Path,
    outdir: str | Path,
    metrics: Sequence[str] | None = None,
    layers: Sequence[str] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Write a PNG per metric (and per histogrammed metric) of every run under ``logdir``, and ``index.md``.

    Args:
        logdir: a TensorBoard log directory, one run or many (each a subdirectory with event files).
        outdir: where the figures go (created); files are ``<metric>.png``, ``hist_<metric>.png``, ``index.md``.
        metrics: only these metrics (default: every one logged).
        layers: only these layers' panels (default: every one logged).
        progress: a tqdm bar while reading several runs.

    Returns:
        The paths written, ``index.md`` last.

    Raises:
        ImportError: matplotlib is not installed (the ``plot`` extra).
        FileNotFoundError, ValueError: see :func:`read_runs`; ``ValueError`` also when none of ``metrics``
            was logged.
    """
    _matplotlib()
    runs = read_runs(logdir, progress=progress)
    found = metrics_of(runs)
    wanted = None if metrics is None else {"angular_update" if m == EQUILIBRIUM else m for m in metrics}
    chosen = [m for m in found if wanted is None or m in wanted]
    if EQUILIBRIUM in chosen and "angular_update" in found:
        chosen.remove(EQUILIBRIUM)  # drawn in the angular_update figure
    if metrics is not None and not chosen:
        raise ValueError(f"none of the metrics {list(metrics)} was logged; found: {', '.join(found)}")
    if layers is not None:
        logged = {layer for metric in chosen for layer in layers_of(runs, metric)}
        logged |= {layer for metric in chosen for layer in layers_of(runs, metric, prefix="sphere_hist")}
        if not logged & set(layers):
            found_layers, of = ", ".join(sorted(logged)), ", ".join(chosen)
            raise ValueError(f"none of the layers {list(layers)} was logged for {of}; found: {found_layers}")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, str, str]] = []
    for metric in chosen:
        if layers is not None and not [layer for layer in layers_of(runs, metric) if layer in layers]:
            continue
        figure = metric_figure(runs, metric, layers)
        path = out / f"{metric}.png"
        figure.savefig(path)
        written.append((path, metric, "every layer a panel, every run a colour"))
    hist_metrics = sorted(
        {tag.split("/")[1] for run in runs.values() for tag in run.histograms if tag.startswith("sphere_hist/")}
    )
    for metric in hist_metrics:
        if wanted is not None and metric not in wanted:
            continue
        if layers is not None and not [m for m in layers_of(runs, metric, prefix="sphere_hist") if m in layers]:
            continue
        figure = histogram_figure(runs, metric, layers)
        path = out / f"hist_{metric}.png"
        figure.savefig(path)
        written.append((path, metric, "per-group distribution over steps, a panel per module and run"))
    index = out / "index.md"
    index.write_text(_index(logdir, runs, written))
    return [path for path, _, _ in written] + [index]


def _index(logdir: str | Path, runs: dict[str, Run], written: list[tuple[Path, str, str]]) -> str:
    lines = [
        "# lightning_sphere figures",
        "",
        f"From `{logdir}`: {len(runs)} run(s): {', '.join(f'`{name}`' for name in runs)}.",
        "",
        "| figure | metric | unit | what |",
        "|---|---|---|---|",
    ]
    for path, metric, what in written:
        doc = METRICS[metric].doc if metric in METRICS else ""
        lines.append(f"| [{path.name}]({path.name}) | `{metric}`: {doc} | {_unit(metric)} | {what} |")
    lines.append("")
    lines += [f"## {path.stem}\n\n![{path.stem}]({path.name})\n" for path, _, _ in written]
    return "\n".join(lines)
