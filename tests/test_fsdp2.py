"""FSDP2 (Lightning's ModelParallelStrategy with fully_shard) and DDP, two CPU processes with gloo: every
logged value equals the single-process run's on the same global batch, the correction moves the weights as
it does in one process, and the monitor's collectives come only on the steps that need them.

Each test starts its two processes once (that costs most of its time) and runs several fits in them."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.strategies import ModelParallelStrategy

from lightning_sphere import SphereMonitor
from tests.conftest import FSDP2
from tests.distributed_helpers import on_two_ranks, trainer
from tests.sharded_models import Module

STEPS = 6
EVERY = 2  # logging steps: 1, 3 and 5 (the last step of fit is measured too: here it is one of them)
#: the torch.distributed calls a monitor could issue
COLLECTIVES = ("all_gather", "all_reduce", "broadcast", "all_gather_object", "broadcast_object_list", "barrier")


class CountCollectives(pl.Callback):
    """Counts the torch.distributed calls of each optimizer step (put it first in the callbacks)."""

    def __init__(self) -> None:
        self.counts: dict[int, Counter] = {}
        self._batch = -1
        self._saved: dict[str, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name in COLLECTIVES:
            original = self._saved[name] = getattr(dist, name)

            def counted(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
                self.counts.setdefault(self._batch, Counter())[_name] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        self._batch = trainer.global_step  # batch indices restart every epoch

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)


class FinalWeights(pl.Callback):
    """The full weights at the end of training (gathered from the shards under FSDP2)."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        full = {n: getattr(p, "full_tensor", lambda p=p: p)().detach().clone() for n, p in pl_module.named_parameters()}
        self.weights = full


class LastRadii(pl.Callback):
    """The AdamG rewrite's virtual radii after the last step (the monitor gives the real weights back at the end
    of fit, and forgets them). Put it after the monitor."""

    def __init__(self) -> None:
        self.radii: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        monitor = next(c for c in trainer.callbacks if isinstance(c, SphereMonitor))
        tracker = monitor._tracker  # introspection, for tests
        self.radii = {} if tracker is None else {name: r.clone() for name, r in tracker.radii().items()}


def strategy_of(name: str) -> Any:
    if name == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    if name == "tp":
        return ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    return name


def fit(
    folder: Path, strategy: str, net: str, optimizer: str, monitor: dict[str, Any] | None, resume: str | None = None
) -> dict[str, Any]:
    """One run; ``strategy`` "single" is one process on the global batch, the others two ranks on half batches.
    ``resume``: a name to save checkpoints under every 2 steps, then resume from step 2's in a new Trainer."""
    count, weights = CountCollectives(), FinalWeights()
    callbacks: list[Any] = [count, weights]
    if monitor is not None:
        callbacks += [SphereMonitor(log_every_n_steps=EVERY, **monitor), LastRadii()]
    single = strategy == "single"
    options: dict[str, Any] = {"max_steps": STEPS}
    if resume is not None:
        from pytorch_lightning.callbacks import ModelCheckpoint

        saving = ModelCheckpoint(dirpath=folder / resume, every_n_train_steps=2, save_top_k=-1)
        options["enable_checkpointing"] = True
    every = [*callbacks, saving] if resume is not None else callbacks
    t = trainer("auto" if single else strategy_of(strategy), 1 if single else 2, every, folder, **options)
    try:
        t.fit(Module(net, optimizer, batch_size=16 if single else 8, shard=strategy in ("fsdp2", "tp")))
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"}
    sphere = callbacks[2] if monitor is not None else None
    out = {
        "history": t.logger.sphere(),
        "metrics": sphere.metrics if sphere else {},
        "summary": sphere.summary() if sphere else "",
        "radii": callbacks[3].radii if sphere else {},
        "weights": weights.weights,
        "collectives": count.counts,
    }
    if resume is not None:  # the same run again from step 2's checkpoint, with a fresh monitor
        callbacks = [CountCollectives(), FinalWeights(), SphereMonitor(log_every_n_steps=EVERY, **monitor)]
        t = trainer("auto" if single else strategy_of(strategy), 1 if single else 2, callbacks, folder, max_steps=STEPS)
        t.fit(
            Module(net, optimizer, batch_size=16 if single else 8, shard=strategy in ("fsdp2", "tp")),
            ckpt_path=str(next((folder / resume).glob("*step=2.ckpt"))),
        )
        out["resumed"] = {"history": t.logger.sphere(), "weights": callbacks[1].weights}
    return out


def _fits(rank: int, folder: Path, runs: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    return [fit(folder, *run) for run in runs]


def assert_same_records(sharded: dict[int, dict[str, float]], single: dict[int, dict[str, float]]) -> None:
    assert sorted(sharded) == sorted(single) == [1, 3, 5]
    for step, expected in single.items():
        got = sharded[step]
        assert sorted(got) == sorted(expected), step
        for key, value in expected.items():
            assert math.isclose(got[key], value, rel_tol=2e-4, abs_tol=1e-6), (step, key, got[key], value)


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)


def assert_like_one_process(ranks: list[dict[str, Any]], single: dict[str, Any]) -> None:
    """Logged once, by rank zero, what one process logs; the same groups; every rank agrees."""
    assert "error" not in ranks[0], ranks[0]
    assert ranks[1]["history"] == {}
    assert_same_records(ranks[0]["history"], single["history"])
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    assert ranks[0]["summary"] == ranks[1]["summary"]
    table = [line.split()[:5] for line in single["summary"].splitlines()]  # the cosines differ by round-off
    assert [line.split()[:5] for line in ranks[0]["summary"].splitlines()] == table
    assert_same_weights(ranks[0]["weights"], single["weights"])


def added_collectives(monitored: dict[int, Counter], plain: dict[int, Counter]) -> dict[int, Counter]:
    """Per batch, the torch.distributed calls the monitor added."""
    return {i: monitored.get(i, Counter()) - plain.get(i, Counter()) for i in range(STEPS)}


#: Runs of the default tests, all in one pair of processes (starting them costs most of the time).
DEFAULT_RUNS = {
    "fsdp2 measured": ("fsdp2", "conv", "sgd", {}),
    "fsdp2 plain": ("fsdp2", "conv", "sgd", None),
    "fsdp2 corrected": ("fsdp2", "conv", "plain", {"spherical_correction": True}),  # AdamG, with virtual radii
    "tensor parallel": ("tp", "block", "adamw", {}),
    "grouped transpose": ("fsdp2", "transpose", "sgd", {}),
    "ddp measured": ("ddp", "conv", "sgd", {}),
    "ddp plain": ("ddp", "conv", "sgd", None),
    # issue 21: any optimizer's update on the sphere
    "fsdp2 rotational": ("fsdp2", "conv", "sgd", {"spherical_correction": "rotational"}),
    # AdamW on the block: on the conv net a bias its norm cancels has a gradient of round-off, which Adam's step
    # turns into lr-sized moves that differ between one process and two
    "fsdp2 hyperball": ("fsdp2", "block", "adamw", {"spherical_correction": "hyperball"}),
    "ddp hyperball": ("ddp", "block", "adamw", {"spherical_correction": "hyperball"}),
}


@pytest.fixture(scope="module")
def default_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Run name → what each rank returned."""
    ranks = on_two_ranks(_fits, tmp_path_factory.mktemp("ranks"), list(DEFAULT_RUNS.values()))
    return {name: [ranks[0][i], ranks[1][i]] for i, name in enumerate(DEFAULT_RUNS)}


@FSDP2
def test_fsdp2_conv_net_measures_as_one_process_does(default_runs, tmp_path):
    """Per-channel groups (3 rows on rank 0, 2 on rank 1), GroupNorm channel groups one of which spans the
    ranks, and a one-row layer of which rank 1 holds nothing."""
    assert_like_one_process(default_runs["fsdp2 measured"], fit(tmp_path, "single", "conv", "sgd", {}))
    for rank in range(2):
        # One gather of the batched per-group sums per logging step (1, 3, 5), and one for the gradient test
        # of the first step; nothing on the other steps.
        added = added_collectives(default_runs["fsdp2 measured"][rank]["collectives"],
                                  default_runs["fsdp2 plain"][rank]["collectives"])  # fmt: skip
        assert added == {0: Counter(all_gather=1), 1: Counter(all_gather=1), 2: Counter(), 3: Counter(all_gather=1),
                         4: Counter(), 5: Counter(all_gather=1)}  # fmt: skip


@FSDP2
def test_fsdp2_correction_moves_the_weights_as_in_one_process(default_runs, tmp_path):
    single = fit(tmp_path, "single", "conv", "plain", {"spherical_correction": True})
    assert_like_one_process(default_runs["fsdp2 corrected"], single)
    plain = fit(tmp_path, "single", "conv", "plain", None)["weights"]
    assert not torch.allclose(single["weights"]["net.conv2.weight"], plain["net.conv2.weight"])  # it did act
    ranks = default_runs["fsdp2 corrected"]
    assert sorted(ranks[0]["radii"]) == sorted(single["radii"]) == ["net.conv1", "net.conv2", "net.conv3"]
    for name, radii in single["radii"].items():  # every rank holds every group's virtual radius, the same bits
        assert torch.equal(ranks[0]["radii"][name], ranks[1]["radii"][name])
        torch.testing.assert_close(ranks[0]["radii"][name], radii, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "name, net, optimizer, mode, weight",
    [
        pytest.param("fsdp2 rotational", "conv", "sgd", "rotational", "net.conv2.weight", marks=FSDP2),
        pytest.param("fsdp2 hyperball", "block", "adamw", "hyperball", "net.q.weight", marks=FSDP2),
        ("ddp hyperball", "block", "adamw", "hyperball", "net.q.weight"),
    ],
)
def test_rotational_and_hyperball_move_the_weights_as_in_one_process(
    default_runs, tmp_path, name, net, optimizer, mode, weight
):
    """Groups whose rows span the ranks: their per-group sums (one collective per pass) and their state, replicated
    on every rank, give the single process's steps and logs (the targets among them)."""
    single = fit(tmp_path, "single", net, optimizer, {"spherical_correction": mode})
    assert_like_one_process(default_runs[name], single)
    plain = fit(tmp_path, "single", net, optimizer, None)["weights"]
    assert not torch.allclose(single["weights"][weight], plain[weight])  # it did act
    assert any(k.startswith("sphere/angular_update_equilibrium/") for step in single["history"].values() for k in step)


@FSDP2
def test_tensor_parallelism_is_refused_naming_parameters_and_placements(default_runs):
    for rank in range(2):
        error = default_runs["tensor parallel"][rank]["error"]
        assert error.startswith("MisconfigurationException"), error
        assert "`net.up.weight` of shape (5, 8), a DTensor with placements (Shard(dim=0),) on the mesh " in error
        assert "`net.down.weight` of shape (8, 5), a DTensor with placements (Shard(dim=1),) on the mesh " in error
        assert "('tensor_parallel',)" in error and "ModelParallelStrategy with FSDP2" in error


@FSDP2
def test_fsdp2_leaves_out_a_grouped_conv_transpose_whose_channels_shards_cut(default_runs, tmp_path):
    assert "1 module" in fit(tmp_path, "single", "transpose", "sgd", {})["summary"]  # one process tracks it
    for result in default_runs["grouped transpose"]:
        assert "error" not in result, result
        assert (
            "  net.up: net.up.weight is a grouped ConvTranspose weight, whose output channels FSDP2's"
            in (result["summary"])
        )


def test_ddp_measures_as_one_process_does_with_no_collective(default_runs, tmp_path):
    assert_like_one_process(default_runs["ddp measured"], fit(tmp_path, "single", "conv", "sgd", {}))
    for rank in range(2):  # DDP keeps replicas identical: each measures alone, no collective on any step
        added = added_collectives(default_runs["ddp measured"][rank]["collectives"],
                                  default_runs["ddp plain"][rank]["collectives"])  # fmt: skip
        assert added == {i: Counter() for i in range(STEPS)}


@FSDP2
@pytest.mark.slow
def test_fsdp2_transformer_block_measures_and_corrects_as_one_process_does(tmp_path):
    """QK-normed heads and a LayerNorm'd projection whose groups span the ranks, a one-row layer rank 1 holds
    no row of; AdamW measured, then corrected (AdamSRT); SGD with momentum corrected (SGDMRT)."""
    runs = [
        ("fsdp2", "block", "adamw", {}),
        ("fsdp2", "block", "adamw", {"spherical_correction": True}),
        ("fsdp2", "block", "sgd", {"spherical_correction": True}),
    ]
    ranks = on_two_ranks(_fits, tmp_path, runs)
    for run, results in zip(runs, zip(*ranks, strict=True), strict=True):
        assert_like_one_process(list(results), fit(tmp_path, "single", *run[1:]))
    corrected, plain = ranks[0][1]["weights"], fit(tmp_path, "single", "block", "adamw", None)["weights"]
    assert not torch.allclose(corrected["net.q.weight"], plain["net.q.weight"])  # the correction did act


@FSDP2
@pytest.mark.slow
def test_fsdp2_follows_a_weight_used_outside_its_module_with_its_bias_as_one_process_does(tmp_path):
    """A qkv weight used by ``F.linear`` with a bias concatenated from the attention's own parameters (issue 25): on
    two ranks the graph holds the unsharded copies, the q rows and their ``q_bias`` entries (split over the ranks)
    are tracked, measured and corrected as in one process."""
    runs = [("fsdp2", "fused", "adamw", {}), ("fsdp2", "fused", "adamw", {"spherical_correction": True})]
    ranks = on_two_ranks(_fits, tmp_path, runs)
    for run, results in zip(runs, zip(*ranks, strict=True), strict=True):
        assert_like_one_process(list(results), fit(tmp_path, "single", *run[1:]))
    assert "net.qkv" in ranks[0][0]["summary"] and "net.q_norm" in ranks[0][0]["summary"]


@FSDP2
@pytest.mark.slow
def test_fsdp2_resumes_from_a_distributed_checkpoint_as_if_never_stopped(tmp_path):
    """The checkpoint holds the real weights r̂ u (what loads and trains as plain SGD's model), and the monitor's
    state the virtual radii (replicated: rank zero writes them): every rank stores u again from both, and the
    resumed run logs and ends as the uninterrupted one, up to the float32 round-off of r̂ u / r̂."""
    ranks = on_two_ranks(_fits, tmp_path, [("fsdp2", "conv", "plain", {"spherical_correction": True}, "ckpt")])
    for (result,) in ranks:
        assert "error" not in result, result
        assert (tmp_path / "ckpt" / "epoch=0-step=2.ckpt").is_dir()  # a distributed checkpoint: one folder
        resumed = result["resumed"]
        if result is ranks[0][0]:
            assert sorted(resumed["history"]) == [3, 5]
            for step in (3, 5):
                # u → r̂ u → u costs two float32 roundings of every weight (1e-7 of it): the step's metrics keep
                # 1e-8 of themselves, except what is round-off to begin with (|cos(g, x)| ~ 1e-5 on an invariant
                # layer) and differences of nearly equal terms (the radial update, −ηλ plus 1e-8).
                assert_same_records_at(resumed["history"], result["history"], step, abs_tol=1e-7)
        assert_same_weights(resumed["weights"], result["weights"])


def assert_same_records_at(
    got: dict[int, dict[str, float]], expected: dict[int, dict[str, float]], step: int, abs_tol: float = 1e-9
) -> None:
    assert sorted(got[step]) == sorted(expected[step])
    for key, value in expected[step].items():
        tolerance = max(abs_tol, 1e-6) if key.startswith("sphere/grad_cos/") else abs_tol
        assert math.isclose(got[step][key], value, rel_tol=1e-6, abs_tol=tolerance), (key, got[step][key], value)


@FSDP2
@pytest.mark.slow
@pytest.mark.parametrize("mode, optimizer", [("hyperball", "adamw"), ("rotational", "sgd")])
def test_fsdp2_resumes_the_rotational_and_hyperball_modes_from_a_distributed_checkpoint(tmp_path, mode, optimizer):
    """§9's state (the radii, the rotational running mean, the SGD decay's momentum as a DTensor) rides in the
    optimizer's part of the distributed checkpoint: the resumed run logs and ends as the uninterrupted one."""
    net = "block" if optimizer == "adamw" else "conv"
    ranks = on_two_ranks(_fits, tmp_path, [("fsdp2", net, optimizer, {"spherical_correction": mode}, "ckpt")])
    for (result,) in ranks:
        assert "error" not in result, result
        resumed = result["resumed"]
        if result is ranks[0][0]:
            for step in (3, 5):
                assert_same_records_at(resumed["history"], result["history"], step, abs_tol=1e-7)
        assert_same_weights(resumed["weights"], result["weights"])


def test_fsdp2_is_refused_with_the_release_on_an_older_torch(monkeypatch):
    """On torch 2.7.1 and 2.8.0 the FSDP2 runs above did not equal one process (AdamW's effective lr half of it on
    two ranks); from 2.9 they do. Before 2.9 a sharded model is refused, with the release to install: by
    SphereMonitor at fit start, by SphereTracker (the plain API, Hugging Face's Trainer) when built."""
    from lightning_sphere import SphereTracker, find_invariant_groups
    from lightning_sphere.core import compat
    from lightning_sphere.integrations import strategies
    from lightning_sphere.tracking import tracker

    model = torch.nn.Sequential(torch.nn.Linear(4, 6, bias=False), torch.nn.LayerNorm(6), torch.nn.Linear(6, 2))
    groups = find_invariant_groups(model, torch.randn(3, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monkeypatch.setattr(compat, "release", lambda version=None: (2, 8, 0) if version is None else (2, 9))
    for owner in (strategies, tracker):  # as if fully_shard had sharded the parameters
        monkeypatch.setattr(owner, "is_dtensor", lambda p: True)
    reason = strategies.check_model(model)  # SphereMonitor, at fit start
    assert reason is not None and reason.startswith("FSDP2 (fully_shard) needs torch >= 2.9 for measuring")
    assert "did not match one process" in reason and reason.endswith(
        "Upgrade torch, or train on one device or with DDP"
    )
    with pytest.raises(ValueError, match=r"SphereTracker: FSDP2 \(fully_shard\) needs torch >= 2\.9"):
        SphereTracker(groups, [optimizer])  # the plain API and Hugging Face's Trainer build one
    monkeypatch.undo()
    assert strategies.check_model(model) is None
    SphereTracker(groups, [optimizer]).close()
