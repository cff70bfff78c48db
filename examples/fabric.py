"""lightning_sphere with Lightning Fabric: ``SphereCallback`` in a Fabric training loop.

The callback goes into ``Fabric(callbacks=[...])``; the loop adds three ``fabric.call`` lines (docs/guides/fabric.md).
Layers are named as you wrote them, through Fabric's wrappers. The loop trains a small BatchNorm conv net on
scikit-learn's 8×8 digits with AdamW corrected into AdamSRT (``spherical_correction="srt"``), clips gradients by
norm with ``fabric.clip_gradients``, and the callback logs the spherical metrics of every 10th step through
Fabric's TensorBoard logger, next to the loss the loop logs, to a new folder per invocation. (The lower-level form,
``SphereTracker`` armed and collected by the loop itself, is the README's plain-PyTorch one, and takes Fabric's
wrapped objects as they are.) A few seconds on one CPU core::

    python examples/fabric.py        # --logdir DIR, --steps N
    tensorboard --logdir lightning_logs/fabric-<date>-<time>
"""

from __future__ import annotations

import argparse
import sys
from collections import OrderedDict
from itertools import islice
from pathlib import Path

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sphere.fabric import SphereCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the examples' shared helpers, wherever this runs from
from example_utils import conv_block, default_logdir, tensorboard_command

#: Measure every this many steps.
MEASURE_EVERY = 10


def make_model() -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            block1=conv_block(1, 16),
            block2=conv_block(16, 32),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            classifier=nn.Linear(32, 10),
        )
    )


def main(steps: int = 200, logdir: str | Path | None = None) -> dict[str, float]:
    """Train for ``steps`` optimizer steps, logging to ``logdir`` (``None``: a new
    ``lightning_logs/fabric-YYYYmmdd-HHMMSS``).

    Returns:
        The scalars of the last measured step.
    """
    torch.set_num_threads(1)  # a small net: one thread is fastest, and immune to a busy second core
    logdir = Path(logdir) if logdir is not None else default_logdir("fabric")
    sphere = SphereCallback(log_every_n_steps=MEASURE_EVERY, spherical_correction="srt")
    fabric = Fabric(
        accelerator="cpu", devices=1, callbacks=[sphere], loggers=TensorBoardLogger(logdir, name="", version="")
    )
    fabric.seed_everything(0)
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    labels = torch.tensor(digits.target)
    loader = fabric.setup_dataloaders(DataLoader(TensorDataset(images, labels), batch_size=64, shuffle=True))

    model = make_model()
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.1))

    batches = (batch for _ in range(steps) for batch in loader)
    for step, (x, y) in enumerate(islice(batches, steps)):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        fabric.call("on_before_backward", loss=loss)  # the first step's detection reads this loss's graph
        fabric.backward(loss)
        fabric.clip_gradients(model, optimizer, max_norm=1.0)  # by norm: the steps stay tangent to the sphere
        optimizer.step()  # measured (every 10th) and corrected by the callback's hooks
        fabric.call("on_train_batch_end")  # the callback logs a measured step's metrics
        if (step + 1) % MEASURE_EVERY == 0:
            fabric.log("train/loss", loss.item(), step=step)
    fabric.call("on_train_end")
    fabric.loggers[0].finalize("success")
    scalars = sphere.metrics
    tracker = sphere.tracker
    assert tracker is not None  # built on the first step

    columns = ("effective_lr", "angular_update", "norm")
    last = steps // MEASURE_EVERY * MEASURE_EVERY - 1
    fabric.print(
        f"{steps} steps of {tracker.corrections[tracker.groups[0].module_name]}; the last measured one, step {last}:"
    )
    fabric.print(f"{'module':<14}" + "".join(f"{column:>16}" for column in columns))
    for name in [*(g.module_name for g in tracker.groups), "all"]:
        fabric.print(f"{name:<14}" + "".join(f"{scalars[f'sphere/{column}/{name}']:>16.3g}" for column in columns))
    fabric.print(f"\n{tensorboard_command(logdir)}")
    return scalars


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--logdir", help="log directory (default: a new lightning_logs/fabric-<date>-<time>)")
    arguments = parser.parse_args()
    main(arguments.steps, arguments.logdir)
