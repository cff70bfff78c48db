"""FSDP2 (Lightning's ModelParallelStrategy with fully_shard), two CPU processes with gloo: every logged value
equals the single-process run's on the same global batch."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from pytorch_lightning.strategies import ModelParallelStrategy

from lightning_sphere import SphereMonitor
from tests.distributed_helpers import on_two_ranks, trainer
from tests.sharded_models import Module

STEPS = 4


def fsdp2() -> ModelParallelStrategy:
    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)


def _fit_sharded(rank: int, folder: Path, net: str, optimizer: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    monitor = SphereMonitor(**kwargs)
    t = trainer(fsdp2(), 2, [monitor], folder, max_steps=STEPS, log_every_n_steps=2)
    t.fit(Module(net, optimizer, batch_size=8))
    return {"history": t.logger.sphere(), "metrics": monitor.metrics, "summary": monitor.summary()}


def fit_single(folder: Path, net: str, optimizer: str, **kwargs: Any) -> dict[str, Any]:
    """The same run in one process on the global batch (both ranks' half batches together)."""
    monitor = SphereMonitor(**kwargs)
    t = trainer("auto", 1, [monitor], folder, max_steps=STEPS, log_every_n_steps=2)
    t.fit(Module(net, optimizer, batch_size=16, shard=False))
    return {"history": t.logger.sphere(), "metrics": monitor.metrics, "summary": monitor.summary()}


def assert_same_records(sharded: dict[int, dict[str, float]], single: dict[int, dict[str, float]]) -> None:
    assert sorted(sharded) == sorted(single) and single
    for step, expected in single.items():
        got = sharded[step]
        assert sorted(got) == sorted(expected), step
        for key, value in expected.items():
            assert math.isclose(got[key], value, rel_tol=2e-4, abs_tol=1e-6), (step, key, got[key], value)


@pytest.mark.parametrize(
    ("net", "optimizer"), [("conv", "sgd"), pytest.param("block", "adamw", marks=pytest.mark.slow)]
)
def test_fsdp2_metrics_equal_the_single_process_run(tmp_path, net, optimizer):
    ranks = on_two_ranks(_fit_sharded, tmp_path, net, optimizer, {"log_every_n_steps": 2})
    single = fit_single(tmp_path, net, optimizer, log_every_n_steps=2)
    assert ranks[1]["history"] == {}  # logged once, by rank zero
    assert_same_records(ranks[0]["history"], single["history"])
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # every rank measured the same
    assert ranks[0]["summary"] == ranks[1]["summary"]
    # The same groups as one process finds (the cosines of the gradient test differ by round-off).
    table = [line.split()[:5] for line in single["summary"].splitlines()]
    assert [line.split()[:5] for line in ranks[0]["summary"].splitlines()] == table
