"""Optimizers put on the sphere: AdamW and Muon, plain, rotational and hyperball, on a normalized transformer.

The data and the model are ``transformer.py``'s, imported: a byte-level language model of the standard library's
own ``.py`` sources (nothing is downloaded), pre-norm RMSNorm blocks with QK-norm, which makes each head's rows of
every ``blocks.<i>.attn.q`` and ``.k`` a radially invariant group that ``SphereMonitor`` tracks. One change: the
split between training and validation falls on a *file boundary*, the end of the module nearest 90% of the
text (``heapq.py`` on CPython 3.11: 1,797,758 of 2,000,000 bytes), so that the held-out modules are whole files
the model never saw a byte of (the last one cut at 2,000,000 bytes, as ``transformer.py`` cuts its text);
``transformer.py`` cuts its concatenated stream at exactly 90%, in the middle of a file.

Six runs, from the same initial weights, on the same batches, for the same number of steps, at constant
learning rates (so that the equilibria below hold and stay put), for each of ``--seeds`` seeds:

- ``adamw``: ``torch.optim.AdamW`` on everything, as ``transformer.py`` (lr 3e-3, betas (0.9, 0.95), weight
  decay 0.1 on the matrices, none on the norms' gains);
- ``adamw-rotational``: the same, with ``SphereMonitor(spherical_correction="rotational")``: the tracked groups'
  angular update is held at AdamW's equilibrium (docs/theory.md §7.1), √(2ηλ(1 − β1)/(1 + β1)) = 0.00562 rad,
  at a fixed norm. Its defaults are Kosson et al.'s, ``center=True`` included, which centers each head's weights
  once, at the first step: RMSNorm does not remove a mean, so that first step also changes the function a little;
- ``adamh``: the same AdamW with ``spherical_correction="hyperball"`` (AdamH): each tracked group stays at its
  initial norm R and moves lr·R per step. Its lr is the step's relative length, so the q and k matrices get a
  param group of their own with lr = AdamW's equilibrium angle above (0.00562, the matched setting: the angle
  the ``adamw`` run settles at, from the first step) and no weight decay (hyperball applies none to the tracked
  groups); every other parameter keeps ``adamw``'s lr and decay;
- ``muon``: ``torch.optim.Muon`` on the blocks' hidden matrices (lr 0.02, Nesterov momentum 0.95, weight decay
  0.1, ``adjust_lr_fn="original"``), AdamW as above on the rest, stepped by the module (manual optimization);
- ``muonh``: the same with ``"hyperball"``; q and k at lr = Muon's equilibrium angle (§8.2, Nesterov),
  0.01103, without weight decay;
- ``muon-rotational``: the same with ``"rotational"``, held at that §8.2 equilibrium.

Every run has the same param groups (q and k apart), so only those hyper-parameters and the correction differ.
The correction applies to the tracked groups only, for every optimizer of the module (Muon and AdamW alike).
The plain runs start far from their equilibrium and approach it with the norms' time constant 1/(2ηλ), 1,667
steps for AdamW and 250 for Muon: within the default 400 steps they turn the heads faster than the modes do.

Prints, and writes to ``<logdir>/transformer_lm.md``, per run: the final validation loss (mean ± std over the
seeds), its difference to the plain run's of the same base, seed by seed (same weights and batches), the
measured angular update of the tracked groups (RMS over the last 25% of the run of the logged
``sphere/angular_update/all``) against the value the run should hold (the logged
``sphere/angular_update_equilibrium/all``: §7/§8 for the plain runs, η_r for rotational, atan(lr) for hyperball),
their ratio, and the training time per seed. The defaults, two seeds of 400 steps, take about 4 minutes on one
thread of a 2-core CPU::

    python examples/transformer_lm.py                 # --steps N --seeds S --runs … --logdir DIR --figure [DIR]
    python examples/transformer_lm.py --quick         # a smoke test: one seed, a tiny model, 24 steps
    lightning-sphere plot lightning_logs/transformer_lm-<date>-<time>/seed0 -o figures --metric angular_update

Logs go to ``<logdir>/seed<k>/<run>`` (TensorBoard; a ``LearningRateMonitor`` logs η, λ and the momentum).
``--figure`` also writes ``transformer_lm_angular_update.png`` (seed 0, the plot command's figure) and
``transformer_lm_loss.png`` (training loss, mean over the seeds, and the corrected runs' less their plain run's)
into ``docs/`` (or the folder given).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the examples' shared helpers, wherever this runs from
import transformer
from example_utils import default_logdir, mean_std, plot_command, quiet_lightning, tensorboard_command
from transformer import ADAMW, FINAL_SHARE, MUON, VALIDATION_SHARE, ByteLM, Config, TinyTransformer

#: Where ``--figure`` writes without a folder: the repository's ``docs/``.
DOCS = Path(__file__).resolve().parents[1] / "docs"


def adamw_equilibrium(hyper: dict[str, Any] = ADAMW) -> float:
    """AdamW's equilibrium angular update (docs/theory.md §7.1), √(2ηλ(1 − β1)/(1 + β1)), rad per step."""
    beta1 = hyper["betas"][0]
    return math.sqrt(2 * hyper["lr"] * hyper["weight_decay"] * (1 - beta1) / (1 + beta1))


def muon_equilibrium(hyper: dict[str, Any] = MUON) -> float:
    """Muon's with Nesterov momentum μ (§8.2), √(2ηλ(1 − μ)²((1 + μ)² + μ⁴/(1 − μ²))), rad per step."""
    mu = hyper["momentum"]
    return math.sqrt(2 * hyper["lr"] * hyper["weight_decay"] * (1 - mu) ** 2 * ((1 + mu) ** 2 + mu**4 / (1 - mu**2)))


#: The hyperball runs' lr on the tracked q and k matrices: the angle per step their plain run settles at.
ADAMH_LR = adamw_equilibrium()
MUONH_LR = muon_equilibrium()


@dataclass(frozen=True)
class Run:
    """One run: its base optimizers (``transformer.py``'s ``"adamw"`` or ``"muon"``) and the correction."""

    base: str
    correction: str | bool = False


RUNS = {
    "adamw": Run("adamw"),
    "adamw-rotational": Run("adamw", "rotational"),
    "adamh": Run("adamw", "hyperball"),
    "muon": Run("muon"),
    "muonh": Run("muon", "hyperball"),
    "muon-rotational": Run("muon", "rotational"),
}
#: ``--quick``: a tiny model and a handful of steps, one seed.
QUICK = Config(d_model=32, n_heads=2, n_layers=2, context=16, batch_size=8)
QUICK_STEPS = 24


# ---------------------------------------------------------------------------------------------------- the data


def file_split(config: Config) -> tuple[int, Path]:
    """The training bytes: the text up to the end of the module whose end is nearest 90% of it (ties: the
    earlier one), and that module. Every module after it is held out."""
    text, files = transformer.stdlib_bytes(config.data_bytes)
    ends = list(accumulate(path.stat().st_size for path in files))
    target = (1 - VALIDATION_SHARE) * len(text)
    candidates = [(end, path) for end, path in zip(ends, files, strict=True) if 0 < end < len(text)]
    if not candidates:
        raise SystemExit(f"the first {len(text):,} bytes of the standard library are one module: no file to hold out")
    return min(candidates, key=lambda candidate: abs(candidate[0] - target))


# ---------------------------------------------------------------------------------------------- the optimizers


def tracked_matrices(model: TinyTransformer) -> list[torch.nn.Parameter]:
    """Every block's q and k projections: the weights whose heads the monitor tracks (and corrects)."""
    return [p for block in model.blocks for p in (block.attn.q.weight, block.attn.k.weight)]


def make_optimizers(run: str, model: TinyTransformer) -> list[torch.optim.Optimizer]:
    """``transformer.py``'s optimizers for the run's base, with the tracked matrices in a param group of their own
    (first): the base's lr and decay, or under hyperball the lr :data:`ADAMH_LR` (:data:`MUONH_LR`) and none."""
    base, hyperball = RUNS[run].base, RUNS[run].correction == "hyperball"
    tracked = tracked_matrices(model)
    ids = {id(p) for p in tracked}
    adamw = {key: value for key, value in ADAMW.items() if key != "weight_decay"}
    if base == "adamw":
        first = {"params": tracked, "weight_decay": ADAMW["weight_decay"]}
        first |= {"lr": ADAMH_LR, "weight_decay": 0.0} if hyperball else {}
        rest = [(name, p) for name, p in model.named_parameters() if id(p) not in ids]
        return [torch.optim.AdamW([first, *transformer.adamw_groups(rest)], **adamw)]
    first = {"params": tracked, **({"lr": MUONH_LR, "weight_decay": 0.0} if hyperball else {})}
    hidden = transformer.hidden_matrices(model)
    muon = transformer.muon_class()([first, {"params": [p for p in hidden if id(p) not in ids]}], **MUON)
    hidden_ids = {id(p) for p in hidden}
    rest = [(name, p) for name, p in model.named_parameters() if id(p) not in hidden_ids]
    return [muon, torch.optim.AdamW(transformer.adamw_groups(rest), **adamw)]


def describe(run: str) -> str:
    """The run's optimizers, the tracked matrices' setting and the correction, in one short line."""
    spec = RUNS[run]
    line = transformer.describe(spec.base)
    if spec.correction == "hyperball":
        lr = ADAMH_LR if spec.base == "adamw" else MUONH_LR
        line += f"; q, k: lr={lr:.5f} weight_decay=0"
    return line + (f'; spherical_correction="{spec.correction}"' if spec.correction else "")


class LM(ByteLM):
    """``transformer.py``'s :class:`~transformer.ByteLM` with this example's runs."""

    runs = tuple(RUNS)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return make_optimizers(self.run_name, self)


# --------------------------------------------------------------------------------------------------- the runs


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    """The markdown table of the runs: mean ± std over the seeds (the value alone for one seed). The validation
    loss is also given less the plain run's of the same base on the same seed (same initial weights, same
    batches: a paired difference, with less noise than the losses' own spread over seeds)."""
    lines = [
        f"| run | val loss (nats/byte) | − plain run's, paired | angular update, last {FINAL_SHARE:.0%} (rad) "
        "| target (rad) | measured / target | training time per seed (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for run, seeds in results.items():
        targets = [r.get("sphere/angular_update_equilibrium/all", math.nan) for r in seeds]
        target = "–" if any(math.isnan(t) for t in targets) else f"{sum(targets) / len(targets):.5f}"
        plain = results.get(RUNS[run].base) if RUNS[run].correction else None
        paired = [r["val/loss"] - p["val/loss"] for r, p in zip(seeds, plain, strict=True)] if plain else [math.nan]
        cells = (
            mean_std([r["val/loss"] for r in seeds], ".3f"),
            mean_std(paired, "+.3f"),
            mean_std([r["final_angular_update"] for r in seeds], ".5f"),
            target,
            mean_std([r["final_angular_update"] / t for r, t in zip(seeds, targets, strict=True)], ".3f"),
            mean_std([r["seconds"] for r in seeds], ".1f"),
        )
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def angular_update_figure(logdir: Path, runs: list[str], seed: int, path: Path) -> Path:
    """The plot command's ``angular_update`` figure (all groups) of one seed's runs: measured, and the value each
    run holds (dashed), with the settling times of the plain runs."""
    from lightning_sphere.reporting.plot import metric_figure, read_runs

    logged = read_runs(logdir / f"seed{seed}", progress=False)
    figure = metric_figure({run: logged[run] for run in runs}, "angular_update", layers=["all"])  # in RUNS' order
    figure.set_size_inches(8, 4.5)
    figure.suptitle(f"Tracked q/k heads, seed {seed}: measured angular update and its target", fontsize="medium")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def moving_average(values: Any, window: int) -> Any:
    """The mean of each ``window`` consecutive values (``len(values) − window + 1`` of them)."""
    import numpy as np

    return np.convolve(values, np.ones(window) / window, mode="valid")


def loss_figure(logdir: Path, runs: list[str], seeds: int, path: Path, window: int = 10) -> Path:
    """From the event files under ``logdir``: the training loss, mean over the seeds, moving average of ``window``
    logged points, and the corrected runs' less their plain run's (on the same batches, from the same weights);
    the legend gives each run's final validation loss (mean ± std over the seeds)."""
    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure

    from lightning_sphere.reporting.plot import DPI, PANEL_INCHES, read_runs

    logged = read_runs(logdir, progress=False)  # every seed<k>/<run>
    palette = matplotlib.colormaps["tab10"]  # as the plot command colours the same runs, in the same order
    figure = Figure(figsize=(2 * PANEL_INCHES[0] + 1, PANEL_INCHES[1] + 1), dpi=DPI, layout="constrained")
    curves_ax, difference_ax = figure.subplots(1, 2)
    curves, val = {}, {}
    for run in runs:
        scalars = [logged[f"seed{seed}/{run}"].scalars for seed in range(seeds)]
        curves[run] = (scalars[0]["train/loss"].steps, np.mean([s["train/loss"].values for s in scalars], axis=0))
        val[run] = mean_std([float(s["val/loss"].values[-1]) for s in scalars], ".3f")
    window = max(1, min(window, len(curves[runs[0]][0])))
    for i, (run, (steps, values)) in enumerate(curves.items()):
        shown = steps[window - 1 :]
        style = {"color": palette(i % palette.N), "marker": "o" if len(shown) < 2 else None}  # a lone point shows
        curves_ax.plot(shown, moving_average(values, window), label=f"{run} (val {val[run]})", **style)
        base = RUNS[run].base
        if RUNS[run].correction and base in curves:
            difference_ax.plot(shown, moving_average(values - curves[base][1], window), **style)
    span = f"{window * transformer.LOG_EVERY}-step moving average"
    curves_ax.set_title(f"training loss (mean of {seeds} seed(s), {span})", fontsize="medium")
    curves_ax.set_ylabel("nats/byte")
    difference_ax.set_title("less its plain run's (adamw, muon), same batches", fontsize="medium")
    difference_ax.axhline(0, color="0.5", linewidth=0.5)
    for ax in (curves_ax, difference_ax):
        ax.set_xlabel("step")
    figure.legend(loc="outside lower center", ncols=3, fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Train every run for every seed, print the monitor's summary once and the table, write the table to
    ``<logdir>/transformer_lm.md`` (and the figures with ``--figure``).

    Returns:
        For each run, one result per seed: ``transformer.train``'s (``"val/loss"``, ``"final_angular_update"``,
        the monitor's last ``"sphere/…"`` metrics, ``"seconds"``, ``"steps"``, ``"tracked"``) and its ``"seed"``.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per run (default 400)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per run, 0, 1, … (default 2)")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="default: all six")
    parser.add_argument("--logdir", type=Path, help="default: a new lightning_logs/transformer_lm-<date>-<time>")
    parser.add_argument(
        "--figure", type=Path, nargs="?", const=DOCS, help=f"write the two figures into this folder (alone: {DOCS})"
    )
    parser.add_argument("--quick", action="store_true", help=f"a smoke test: one seed, {QUICK_STEPS} steps, tiny model")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a small net: one thread is fastest, and immune to a busy second core
    steps, seeds, config = (QUICK_STEPS, 1, QUICK) if args.quick else (args.steps, args.seeds, Config())
    logdir = args.logdir if args.logdir is not None else default_logdir("transformer_lm")
    if logdir.exists() and any(logdir.iterdir()):
        raise SystemExit(f"{logdir} is not empty: give a fresh --logdir, so that runs are not mixed")
    split, last_trained = file_split(config)
    text, files = transformer.stdlib_bytes(config.data_bytes)
    held_out = files[files.index(last_trained) + 1 :]
    parameters = sum(p.numel() for p in TinyTransformer(config).parameters())
    setting = (
        f"{parameters / 1e6:.2f} M parameters ({config.n_layers} layers, d_model {config.d_model}, "
        f"{config.n_heads} heads); {steps} steps of {config.batch_size}×{config.context} bytes; seeds 0..{seeds - 1}; "
        f"training on {split:,} bytes ({files[0].name} … {last_trained.name}), validation on {len(text) - split:,} "
        f"({held_out[0].name} … {held_out[-1].name}, the last cut)"
    )
    print(f"transformer_lm: {setting}; logs in {logdir}")
    start = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {run: [] for run in args.runs}
    summary = ""
    for seed in range(seeds):
        for run in args.runs:
            print(f"seed {seed}  {run:<17}", end="", flush=True)
            with quiet_lightning():
                result, run_summary = transformer.train(
                    run, steps, config, seed, logdir, module_class=LM, spherical_correction=RUNS[run].correction,
                    version=f"seed{seed}/{run}", split=split,
                )  # fmt: skip
            results[run].append({**result, "seed": seed})
            summary = summary or run_summary  # the first run's: the same groups in every run
            print(f"{result['seconds']:6.1f} s  {describe(run)}")
    wall = time.perf_counter() - start
    text_table = table(results)
    print(f"\n{summary}\n\n{text_table}\n\n{len(args.runs) * seeds} runs in {wall:.0f} s")
    logdir.mkdir(parents=True, exist_ok=True)
    (logdir / "transformer_lm.md").write_text(f"{setting}\n\n{text_table}\n")
    if args.figure is not None:
        print(angular_update_figure(logdir, args.runs, 0, args.figure / "transformer_lm_angular_update.png"))
        print(loss_figure(logdir, args.runs, seeds, args.figure / "transformer_lm_loss.png"))
    print(f"\n{tensorboard_command(logdir)}\n{plot_command(logdir / 'seed0')}")
    return results


if __name__ == "__main__":
    main()
