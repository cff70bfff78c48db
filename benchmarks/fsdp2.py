"""What SphereMonitor costs under FSDP2 (Lightning's ModelParallelStrategy with ``fully_shard``), two CPU
processes with gloo: the training-step time of a logging step (every step measured, its per-group sums
gathered over the ranks) and of a corrected step (AdamSRT on every step, its per-group sums gathered on every
step), each over the same strategy without the monitor.

    python benchmarks/fsdp2.py              # about 2 minutes on 2 cores
    python benchmarks/fsdp2.py --quick      # smoke run

Configurations run in turn inside one pair of processes, the order reversed every other repeat; a ratio is
taken within each repeat (median step time over median step time), and the table shows the median ratio and
its min–max over repeats, with the monitor's own collectives (calls per step, warm-up steps included, and
their time). The model is a pre-norm transformer block (tests/sharded_models.py) whose QK-normed
heads and LayerNorm'd projection have groups spanning the two ranks.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_sphere import SphereMonitor
from lightning_sphere.core.sharding import GroupSum
from tests.distributed_helpers import on_two_ranks
from tests.sharded_models import Block

#: name → SphereMonitor arguments (None: no monitor)
CONFIGS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "logging": {"log_every_n_steps": 1},
    "corrected": {"log_every_n_steps": 10**6, "spherical_correction": True},
}
SIZES = {"d": 128, "heads": 4, "head_dim": 32, "hidden": 512, "tokens": 32}


class BlockModule(pl.LightningModule):
    def __init__(self, batches: int, batch_size: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = Block(**SIZES)
        self.batches, self.batch_size = batches, batch_size

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        self.net.shard(self.device_mesh["data_parallel"], fully_shard)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.1)

    def train_dataloader(self) -> DataLoader:
        n = self.batches * self.batch_size
        gen = torch.Generator().manual_seed(self.global_rank)
        x = torch.randn(n, SIZES["tokens"], SIZES["d"], generator=gen)
        return DataLoader(TensorDataset(x, torch.randint(0, 3, (n,), generator=gen)), batch_size=self.batch_size)


class StepTimes(pl.Callback):
    """Seconds from one ``on_train_batch_start`` to the next (the last step: to ``on_train_end``)."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())

    def times(self, skip: int) -> list[float]:
        return [b - a for a, b in zip(self.starts[skip:], self.starts[skip + 1 :], strict=False)]


def _time(config: dict[str, Any] | None, folder: Path, warmup: int, steps: int) -> float:
    from pytorch_lightning.strategies import ModelParallelStrategy

    timer = StepTimes()
    callbacks: list[Any] = [timer] + ([SphereMonitor(**config)] if config is not None else [])
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=warmup + steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, use_distributed_sampler=False, default_root_dir=folder, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(BlockModule(warmup + steps, batch_size=16))
    return statistics.median(timer.times(warmup))


def _rank(rank: int, folder: Path, repeats: int, warmup: int, steps: int) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    medians: dict[str, list[float]] = {name: [] for name in CONFIGS}
    gathers: dict[str, list[float]] = {name: [0, 0.0] for name in CONFIGS}  # calls, seconds
    original = GroupSum.__call__
    current = [""]

    def timed(self: GroupSum, partial: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = original(self, partial)
        gathers[current[0]][0] += 1
        gathers[current[0]][1] += time.perf_counter() - start
        return out

    GroupSum.__call__ = timed  # the monitor's own collectives: how many, and their time
    for repeat in range(repeats):
        names = list(CONFIGS) if repeat % 2 == 0 else list(reversed(CONFIGS))
        for name in names:
            current[0] = name
            medians[name].append(_time(CONFIGS[name], folder, warmup, steps))
    GroupSum.__call__ = original
    per_step = repeats * (warmup + steps)
    return {"medians": medians, "gathers": {k: (c / per_step, t / per_step) for k, (c, t) in gathers.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats of 5 steps")
    args = parser.parse_args()
    repeats, warmup, steps = (2, 2, 5) if args.quick else (7, 3, 30)
    with TemporaryDirectory() as folder:
        ranks = on_two_ranks(_rank, Path(folder), repeats, warmup, steps, timeout=3600)
    medians = ranks[0]["medians"]  # rank zero's clock; the ranks wait for each other at every collective
    gathers = ranks[0]["gathers"]
    print(f"FSDP2, 2 CPU processes (gloo, 1 thread each), transformer block {SIZES}, AdamW, batch 16 per rank")
    print(f"{repeats} repeats of {steps} steps after {warmup} warm-up steps\n")
    print("| step | median ratio | min–max | ms / ms (medians) | monitor's all_gathers per step, their ms |")
    print("|---|---|---|---|---|")
    plain = medians["plain"]
    labels = {"logging": "logging step / no monitor", "corrected": "corrected step (AdamSRT) / no monitor"}
    for name, label in labels.items():
        ratios = [a / b for a, b in zip(medians[name], plain, strict=True)]
        detail = f"{1e3 * statistics.median(medians[name]):.1f} / {1e3 * statistics.median(plain):.1f}"
        calls, seconds = gathers[name]
        spread = f"{min(ratios):.3f}–{max(ratios):.3f}"
        print(f"| {label} | {statistics.median(ratios):.3f} | {spread} | {detail} | {calls:.2f}, {1e3 * seconds:.2f} |")


if __name__ == "__main__":
    main()
