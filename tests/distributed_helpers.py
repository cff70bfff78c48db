"""Two CPU processes with the gloo backend, launched the way a cluster launcher would (the environment
variables Lightning reads), so that DDP and ModelParallelStrategy run inside them without relaunching pytest."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from tests.lightning_helpers import MemoryLogger

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, fn: Callable[..., Any], folder: Path, args: tuple[Any, ...]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )  # fmt: skip
    torch.set_num_threads(1)
    result = fn(rank, folder, *args)
    torch.save(result, folder / f"rank{rank}.pt")


def on_two_ranks(fn: Callable[..., Any], folder: Path, *args: Any, timeout: float = 300) -> list[Any]:
    """Run ``fn(rank, folder, *args)`` in two fresh processes; return what each returned (``torch.save``-able).

    Fails after ``timeout`` seconds: ranks that disagree wait for each other's collectives forever.
    """
    context = mp.spawn(_worker, args=(_free_port(), fn, folder, args), nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"the ranks did not finish in {timeout:g} s: a collective on one rank only?")
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


class RankZeroLogger(MemoryLogger):
    """A :class:`MemoryLogger` that, like Lightning's own loggers, records on rank zero only."""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics, step)


def trainer(strategy: Any, devices: int, callbacks: list[Any], folder: Path, **kwargs: Any) -> pl.Trainer:
    options = dict(
        accelerator="cpu", devices=devices, strategy=strategy, logger=RankZeroLogger(), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, use_distributed_sampler=False,
        default_root_dir=folder, callbacks=callbacks,
    )  # fmt: skip
    return pl.Trainer(**(options | kwargs))
