"""lightning_sphere with Lightning Fabric: the tracker in a Fabric training loop.

Fabric wraps the model and the optimizer (``fabric.setup``); lightning_sphere takes the wrapped objects as they
are and names layers as you wrote them. The loop trains a small BatchNorm conv net on scikit-learn's 8×8
digits with AdamW corrected into AdamSRT (``correction="srt"``), clips gradients by norm with
``fabric.clip_gradients``, and logs the spherical metrics of every 10th step next to the loss through Fabric's
TensorBoard logger, to a new folder per invocation. A few seconds on one CPU core::

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

from lightning_sphere import SphereTracker, find_invariant_groups, summarize

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
    fabric = Fabric(accelerator="cpu", devices=1, loggers=TensorBoardLogger(logdir, name="", version=""))
    fabric.seed_everything(0)
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    labels = torch.tensor(digits.target)
    loader = fabric.setup_dataloaders(DataLoader(TensorDataset(images, labels), batch_size=64, shuffle=True))

    model = make_model()
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.1))
    # One example batch finds the groups; Fabric's wrappers are looked through: names are block1.conv, …
    groups = find_invariant_groups(model, images[:64])
    fabric.print(summarize(groups, model, groups.rejected))
    tracker = SphereTracker(groups, [optimizer], correction="srt", model=model)

    scalars: dict[str, float] = {}
    batches = (batch for _ in range(steps) for batch in loader)
    for step, (x, y) in enumerate(islice(batches, steps)):
        if step % MEASURE_EVERY == 0:  # measure the next optimizer step
            tracker.arm()
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        fabric.backward(loss)
        fabric.clip_gradients(model, optimizer, max_norm=1.0)  # by norm: the steps stay tangent to the sphere
        optimizer.step()
        if (measurement := tracker.collect()) is not None:
            scalars = measurement.scalars
            fabric.log_dict({"train/loss": loss.item(), **scalars}, step=step)
    tracker.close()
    fabric.loggers[0].finalize("success")

    columns = ("effective_lr", "angular_update", "norm")
    last = (steps - 1) // MEASURE_EVERY * MEASURE_EVERY
    fabric.print(f"{steps} steps of {tracker.corrections[groups[0].module_name]}; the last measured one, step {last}:")
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
