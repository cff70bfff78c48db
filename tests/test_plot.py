"""`lightning-sphere plot` on event files a real fit writes here: the PNGs, their data, the errors."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_sphere import SphereMonitor
from lightning_sphere.reporting import plot as plotting
from lightning_sphere.reporting.cli import main
from tests.lightning_helpers import MemoryLogger, Net

#: ηλ = 0.05 at μ = 0.9: the settling time (1 − μ)/(2ηλ) = 1 step falls inside the 16-step run (§7.2).
LR, WEIGHT_DECAY, MOMENTUM, STEPS = 0.2, 0.25, 0.9, 16
OPTIMIZERS = {
    "sgdm": lambda params: torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=1e-3),
}


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, MemoryLogger]]:
    """Two runs, SGD-M and Adam, under one log directory; each also logged to memory (the reference)."""
    root = tmp_path_factory.mktemp("logs")
    memory = {}
    for name, optimizer in OPTIMIZERS.items():
        memory[name] = MemoryLogger()
        trainer = pl.Trainer(
            max_steps=STEPS,
            log_every_n_steps=2,
            logger=[TensorBoardLogger(root, name="", version=name, default_hp_metric=False), memory[name]],
            callbacks=[
                SphereMonitor(histogram_every_n_steps=4),
                LearningRateMonitor(log_momentum=True, log_weight_decay=True),
            ],
            accelerator="cpu",
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(Net(optimizer, dtype=torch.float32))
    return root, memory


def logged(memory: MemoryLogger) -> dict[str, tuple[list[int], list[float]]]:
    """tag → (steps, values) as handed to the loggers."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for step, metrics in memory.history:
        for tag, value in metrics.items():
            steps, values = series.setdefault(tag, ([], []))
            steps.append(step)
            values.append(float(value))
    return series


def lines_by_gid(figure) -> dict[str, object]:
    return {line.get_gid(): line for ax in figure.axes for line in ax.get_lines() if line.get_gid()}


def test_every_logged_series_is_plotted_as_logged(logs):
    root, memory = logs
    runs = plotting.read_runs(root, progress=False)
    assert sorted(runs) == ["adam", "sgdm"]
    for metric in plotting.metrics_of(runs):
        if metric == "angular_update_equilibrium":
            continue  # drawn in the angular_update figure
        lines = lines_by_gid(plotting.metric_figure(runs, metric))
        expected = {}
        for name in runs:
            for tag, series in logged(memory[name]).items():
                drawn_here = tag.startswith(f"sphere/{metric}/")
                drawn_here |= metric == "angular_update" and tag.startswith("sphere/angular_update_equilibrium/")
                drawn_here |= metric == "effective_lr" and tag.startswith("lr-") and "-" not in tag[3:]
                if drawn_here:
                    expected[f"{name}|{tag}"] = series
        assert expected
        assert {gid for gid in lines if not gid.endswith("|settling")} == set(expected)
        for gid, (steps, values) in expected.items():
            np.testing.assert_array_equal(lines[gid].get_xdata(), steps)
            np.testing.assert_allclose(lines[gid].get_ydata(), values, rtol=1e-6)  # TensorBoard keeps float32
    # the SGD-M run logged η, λ and μ: its settling time (1 − μ)/(2ηλ) is drawn in every angular-update panel
    lines = lines_by_gid(plotting.metric_figure(runs, "angular_update"))
    np.testing.assert_allclose(
        lines["sgdm|settling"].get_xdata(), [(1 - MOMENTUM) / (2 * LR * WEIGHT_DECAY)] * 2, rtol=1e-6
    )
    assert "adam|settling" not in lines  # Adam with L2 decay has no equilibrium


def test_pngs_have_the_size_of_their_panels(logs, tmp_path):
    root, memory = logs
    written = plotting.plot(root, tmp_path / "out", progress=False)
    assert written[-1].name == "index.md"
    keys = {tag for mem in memory.values() for _, metrics in mem.history for tag in metrics}
    metrics = {tag.split("/")[1] for tag in keys if tag.startswith("sphere/")} - {"angular_update_equilibrium"}
    histograms = ("angular_update", "effective_lr", "norm")
    expected_names = {f"{m}.png" for m in metrics} | {f"hist_{m}.png" for m in histograms}
    assert {p.name for p in written[:-1]} == expected_names
    index = written[-1].read_text()
    for metric in metrics:
        panels = len({tag for tag in keys if tag.startswith(f"sphere/{metric}/")}) + (metric == "effective_lr")
        columns, rows = min(panels, 3), math.ceil(panels / min(panels, 3))
        path = tmp_path / "out" / f"{metric}.png"
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (400 * columns, 300 * rows)
            pixels = np.asarray(image.convert("L"))
        assert pixels.std() > 10  # not blank
        assert f"]({metric}.png)" in index
    # the histograms: one row per module, one column per run
    with Image.open(tmp_path / "out" / "hist_norm.png") as image:
        assert image.size == (400 * 2, 300 * 2)


def test_histogram_heat_map_columns_are_the_logged_distributions(logs):
    root, _ = logs
    runs = plotting.read_runs(root, progress=False)
    figure = plotting.histogram_figure(runs, "norm")
    meshes = {m.get_gid(): m for ax in figure.axes for m in ax.collections if m.get_gid()}
    assert set(meshes) == {f"{run}|sphere_hist/norm/{module}" for run in runs for module in ("net.0", "net.3")}
    for gid, mesh in meshes.items():
        run, tag = gid.split("|")
        matrix = np.asarray(mesh.get_array()).reshape(plotting.HISTOGRAM_BINS, -1)
        assert matrix.shape[1] == len(runs[run].histograms[tag].steps) == STEPS // 4
        np.testing.assert_allclose(matrix.sum(0), 1, rtol=1e-12)


def test_histogram_matrix_keeps_counts_on_matching_edges():
    values = np.random.default_rng(0).normal(size=500)
    edges = np.linspace(values.min(), values.max(), 11)
    counts, _ = np.histogram(values, edges)
    hist = plotting.Histograms([0], [edges], [counts.astype(float)])
    np.testing.assert_allclose(plotting.histogram_matrix(hist, edges, log=False)[:, 0], counts / 500, atol=1e-12)
    # spread over a finer grid, each bucket's share splits evenly
    fine = np.linspace(edges[0], edges[-1], 21)
    np.testing.assert_allclose(plotting.histogram_matrix(hist, fine, log=False)[:, 0], np.repeat(counts / 1000, 2))


def test_command_line_one_metric_one_layer(logs, tmp_path, capsys):
    root, _ = logs
    args = ["plot", str(root), "-o", str(tmp_path), "--metric", "angular_update", "--layer", "all", "--no-progress"]
    assert main(args) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["angular_update.png", "index.md"]
    with Image.open(tmp_path / "angular_update.png") as image:
        assert image.size == (400, 300)
    assert str(tmp_path / "index.md") in capsys.readouterr().out


def test_errors_name_what_was_found(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no TensorBoard event files .* holds notes\.txt"):
        plotting.read_runs(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        plotting.read_runs(tmp_path / "missing")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(tmp_path / "plain") as writer:
        writer.add_scalar("train/loss", 1.0, 0)
    found = r"none of the 1 runs .*\(plain\) logged `sphere/` metrics; their tags: train/loss"
    with pytest.raises(ValueError, match=found):
        plotting.read_runs(tmp_path)
    assert main(["plot", str(tmp_path), "-o", str(tmp_path / "out")]) == 2
    assert "error: none of the 1 runs" in capsys.readouterr().err


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install -e \".\[plot\]\""):
        plotting.plot(tmp_path, tmp_path / "out")


def test_only_the_keys_present_are_drawn():
    """A run with per-layer angular updates but the equilibrium only as `/all`, and no η, λ logged: every
    panel gets the `/all` equilibrium, no settling line, and a note saying why."""
    steps = np.arange(0, 50, 10)
    series = {
        "sphere/angular_update/all": plotting.Series(steps, np.linspace(0.1, 0.05, 5)),
        "sphere/angular_update/conv": plotting.Series(steps, np.linspace(0.2, 0.06, 5)),
        "sphere/angular_update_equilibrium/all": plotting.Series(steps, np.full(5, 0.05)),
    }
    runs = {"run": plotting.Run("run", Path("."), series, {})}
    figure = plotting.metric_figure(runs, "angular_update")
    assert [ax.get_title() for ax in figure.axes if ax.get_visible()] == [
        "angular_update · all",
        "angular_update · conv",
    ]
    for ax in figure.axes[:2]:
        gids = [line.get_gid() for line in ax.get_lines()]
        assert gids[1] == "run|sphere/angular_update_equilibrium/all" and "run|settling" not in gids
    assert figure.axes[0].texts[0].get_text() == "η, λ (μ) not logged, no settling time: run"  # said once
    with pytest.raises(ValueError, match="no run logged sphere/norm/<layer>; metrics found: angular_update"):
        plotting.metric_figure(runs, "norm")


def test_a_loggers_prefix_is_read_through(tmp_path):
    # A new user's trial: `plot` refused a run logged with TensorBoardLogger(prefix="x"), "no sphere/ metrics".
    from lightning_sphere.reporting.sinks import LoggerSink
    from lightning_sphere.tracking.tracker import Measurement

    logger = TensorBoardLogger(tmp_path, name="", version="run", prefix="x")
    for step in (1, 2):
        hist = {"sphere_hist/norm/conv": torch.tensor([1.0, 2.0, 4.0]) * step}
        LoggerSink().write([logger], Measurement({"sphere/norm/all": 0.5 * step}, hist), step=step)
        logger.log_metrics({"lr-SGD": 0.1}, step=step)
    logger.finalize("success")
    (run,) = plotting.read_runs(tmp_path, progress=False).values()
    assert set(run.scalars) == {"sphere/norm/all", "lr-SGD"} and set(run.histograms) == {"sphere_hist/norm/conv"}
    assert run.scalars["sphere/norm/all"].values.tolist() == [0.5, 1.0]
    assert plotting.metric_figure({"run": run}, "norm").axes[0].get_title() == "norm · all"


def test_the_legend_names_only_the_runs_drawn():
    # An SGD-M run has no deformation_cos (Adam's): the figure of that metric does not list it.
    steps = np.arange(0, 30, 10)
    adam = {"sphere/deformation_cos/all": plotting.Series(steps, np.full(3, 0.9))}
    sgdm = {"sphere/norm/all": plotting.Series(steps, np.ones(3))}
    runs = {name: plotting.Run(name, Path("."), s, {}) for name, s in (("adam", adam), ("sgdm", sgdm))}
    (legend,) = plotting.metric_figure(runs, "deformation_cos").legends
    assert [text.get_text() for text in legend.get_texts()] == ["adam"]
    (legend,) = plotting.metric_figure(runs, "norm").legends
    assert [text.get_text() for text in legend.get_texts()] == ["sgdm"]


def test_runs_without_sphere_metrics_are_named_and_left_out(logs, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    root, _ = logs
    shutil.copytree(root / "sgdm", tmp_path / "sgdm")
    with SummaryWriter(tmp_path / "baseline") as writer:
        writer.add_scalar("train/loss", 1.0, 0)
    with pytest.warns(UserWarning, match="no `sphere/` metrics: baseline"):
        assert list(plotting.read_runs(tmp_path, progress=False)) == ["sgdm"]


def test_histogram_matrix_keeps_a_bucket_of_one_value():
    """torch puts the maximum in a last bucket of zero width when all values are equal: still counted."""
    hist = plotting.Histograms([0], [np.array([1.0, 2.0, 2.0])], [np.array([3.0, 1.0])])
    column = plotting.histogram_matrix(hist, np.linspace(1.0, 2.0, 5), log=False)[:, 0]
    np.testing.assert_allclose(column, [0.1875, 0.1875, 0.1875, 0.4375])


def test_filters_that_match_nothing_are_refused_and_the_equilibrium_means_its_chart(logs, tmp_path, capsys):
    root, _ = logs
    assert main(["plot", str(root), "-o", str(tmp_path / "none"), "--layer", "nope", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "none of the layers ['nope'] was logged" in error and "found: all, net.0, net.3" in error
    written = plotting.plot(root, tmp_path / "eq", metrics=["angular_update_equilibrium"], progress=False)
    assert [p.name for p in written] == ["angular_update.png", "hist_angular_update.png", "index.md"]  # its chart


def synthetic_run(lr_tag: str, lrs, decay: float, momentum: float | None = None, equilibrium: bool = True):
    steps = np.arange(len(lrs))
    series = {
        "sphere/angular_update/all": plotting.Series(steps, np.full(len(lrs), 0.02)),
        lr_tag: plotting.Series(steps, np.array(lrs, dtype=float)),
        f"{lr_tag}-weight_decay": plotting.Series(steps, np.full(len(lrs), decay)),
    }
    if momentum is not None:
        series[f"{lr_tag}-momentum"] = plotting.Series(steps, np.full(len(lrs), momentum))
    if equilibrium:
        series["sphere/angular_update_equilibrium/all"] = plotting.Series(steps, np.full(len(lrs), 0.02))
    return plotting.Run("run", Path("."), series, {})


def test_settling_time_per_optimizer_from_the_first_positive_lr():
    # §7.2, computed here: 1/(2ηλ) for AdamW (and Adam whose run logged an equilibrium: decoupled decay),
    # (1 − μ)/(2ηλ) for SGD with momentum; a warm-up from lr 0 is skipped; Adam with L2 decay gets none.
    assert plotting.settling_steps(synthetic_run("lr-AdamW", [0.0, 1e-3, 2e-3], 0.5)) == [1 / (2 * 1e-3 * 0.5)]
    assert plotting.settling_steps(synthetic_run("lr-Adam", [1e-3], 0.5)) == [1 / (2 * 1e-3 * 0.5)]
    assert plotting.settling_steps(synthetic_run("lr-Adam", [1e-3], 0.5, equilibrium=False)) == []
    sgdm = plotting.settling_steps(synthetic_run("lr-SGD/pg1", [0.1], 1e-2, momentum=0.9))
    assert sgdm == pytest.approx([(1 - 0.9) / (2 * 0.1 * 1e-2)])
    assert plotting.settling_steps(synthetic_run("lr-SGD", [0.1], 1e-2)) == []  # μ not logged: unknown
    # §8.2: torch's Muon decays the weights by (1 − ηλ) per step, as AdamW; Prodigy's learning rate is d·η, and
    # lion-pytorch's λ is per unit of η or not (decoupled_weight_decay), which no tag says: none for them
    assert plotting.settling_steps(synthetic_run("lr-Muon", [2e-2], 0.1, momentum=0.95)) == [1 / (2 * 2e-2 * 0.1)]
    for name in ("lr-Lion", "lr-Prodigy"):
        run = synthetic_run(name, [1e-3] * 5, 0.1)
        assert plotting.settling_steps(run) == []
        figure = plotting.metric_figure({"run": run}, "angular_update")
        assert figure.axes[0].texts[0].get_text() == f"no settling time known for {name[3:]} (§7.2): run"
    run = synthetic_run("lr-AdamW", [1e-3] * 5, 0.1)
    del run.scalars["lr-AdamW-weight_decay"]
    figure = plotting.metric_figure({"run": run}, "angular_update")
    assert figure.axes[0].texts[0].get_text().startswith("λ not logged (LearningRateMonitor(log_weight_decay=True))")


def test_a_run_whose_norm_is_held_gets_no_settling_time():
    """The rotational and hyperball modes (§9) hold the norm: the dashed line is the angle they impose, nothing
    settles, though LearningRateMonitor logged η and λ (AdamW's param groups)."""
    run = synthetic_run("lr-AdamW", [1e-3] * 50, 0.1)
    steps = run.scalars["lr-AdamW"].steps
    run.scalars["sphere/norm/all"] = plotting.Series(steps, np.full(steps.size, 2.3))
    figure = plotting.metric_figure({"run": run}, "angular_update")
    ax = figure.axes[0]
    assert not [line for line in ax.get_lines() if line.get_gid() == "run|settling"]
    assert [t.get_text() for t in ax.texts] == ["norm held (rotational or hyperball, §9): nothing settles: run"]
    run.scalars["sphere/norm/all"] = plotting.Series(steps, np.linspace(2.3, 2.4, steps.size))  # a plain run's
    assert not plotting.norm_held(run)


def test_a_single_logged_point_is_drawn_with_a_marker():
    series = {"sphere/norm/all": plotting.Series(np.array([3]), np.array([1.5]))}
    figure = plotting.metric_figure({"run": plotting.Run("run", Path("."), series, {})}, "norm")
    (line,) = [line for line in figure.axes[0].get_lines() if line.get_gid() == "run|sphere/norm/all"]
    assert line.get_marker() == "o"


def test_a_run_with_two_optimizers_names_each_settling_time():
    """Muon for the matrices, AdamW for the rest (the transformer example): both times, each line named."""
    muon = synthetic_run("lr-Muon", [0.02] * 400, 0.1)
    adamw = synthetic_run("lr-AdamW", [3e-3] * 400, 0.1)
    run = plotting.Run("run", Path("."), {**muon.scalars, **adamw.scalars}, {})
    assert plotting.settling_times(run) == pytest.approx({"Muon": 1 / (2 * 0.02 * 0.1), "AdamW": 1 / (2 * 3e-3 * 0.1)})
    figure = plotting.metric_figure({"run": run}, "angular_update")
    ax = figure.axes[0]
    drawn = [line.get_xdata()[0] for line in ax.get_lines() if line.get_gid() == "run|settling"]
    assert drawn == pytest.approx([250.0])  # AdamW's 1,667 steps lie beyond 400 steps × SETTLING_BEYOND
    assert [t.get_text() for t in ax.texts if t.get_text() == "Muon"] == ["Muon"]
    assert any("settles in 1,667 steps (AdamW), past the end" in t.get_text() for t in ax.texts)
