"""lightning_sphere without Lightning: the tracker in a plain PyTorch training loop.

Finds the radially invariant filters of a small BatchNorm conv net from one example batch, prints them,
then trains on scikit-learn's 8×8 digits with SGD-M, measuring every 10th optimizer step and writing
the spherical metrics to TensorBoard with a ``SummaryWriter``, to a new folder per invocation (the command
that shows it is printed at the end). A few seconds on one CPU core::

    python examples/plain_torch.py       # --logdir DIR, --steps N
    tensorboard --logdir lightning_logs/plain_torch-<date>-<time>
"""

from __future__ import annotations

import argparse
import sys
from collections import OrderedDict
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter

import lightning_sphere
from lightning_sphere import summarize

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the examples' shared helpers, wherever this runs from
from example_utils import default_logdir, tensorboard_command

#: Measure every this many steps, and take per-group histograms every this many.
MEASURE_EVERY = 10
HISTOGRAM_EVERY = 50


def make_model() -> nn.Sequential:
    """Two Conv → BatchNorm → ReLU blocks and a linear classifier."""
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 32, 3, padding=1, bias=False),
            bn1=nn.BatchNorm2d(32),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(32, 64, 3, padding=1, bias=False),
            bn2=nn.BatchNorm2d(64),
            relu2=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            classifier=nn.Linear(64, 10),
        )
    )


def batches(loader: DataLoader) -> Iterator[tuple[Tensor, Tensor]]:
    """The loader's batches, epoch after epoch, without end."""
    while True:
        yield from loader


def main(steps: int = 300, logdir: str | Path | None = None) -> dict[str, float]:
    """Train for ``steps`` optimizer steps, logging to ``logdir`` (``None``: a new
    ``lightning_logs/plain_torch-YYYYmmdd-HHMMSS``).

    Returns:
        The scalars of the last measured step.
    """
    torch.set_num_threads(1)  # a small net: one thread is fastest, and immune to a busy second core
    logdir = Path(logdir) if logdir is not None else default_logdir("plain_torch")
    torch.manual_seed(0)
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    labels = torch.tensor(digits.target)
    x_train, x_val, y_train, y_val = train_test_split(images, labels, test_size=0.2, stratify=labels, random_state=0)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True)

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    groups = lightning_sphere.find_invariant_groups(model, x_train[:64])
    print(summarize(groups, model, groups.rejected))
    tracker = lightning_sphere.SphereTracker(groups, [optimizer])

    scalars: dict[str, float] = {}
    with SummaryWriter(logdir) as writer:
        for step, (x, y) in enumerate(islice(batches(loader), steps)):
            if step % MEASURE_EVERY == 0:  # measure the next optimizer step
                tracker.arm(histograms=step % HISTOGRAM_EVERY == 0)
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if (measurement := tracker.collect()) is not None:
                scalars = measurement.scalars
                writer.add_scalar("train/loss", loss.item(), step)
                for tag, value in scalars.items():
                    writer.add_scalar(tag, value, step)
                for tag, values in measurement.histograms.items():
                    writer.add_histogram(tag, values, step)
    tracker.close()

    model.eval()
    with torch.no_grad():
        accuracy = (model(x_val).argmax(1) == y_val).float().mean().item()
    print(f"after {steps} steps: validation accuracy {accuracy:.1%}")
    columns = ("effective_lr", "angular_update", "norm")
    print(f"{'module':<8}" + "".join(f"{column:>16}" for column in columns))
    for name in [*(g.module_name for g in tracker.groups), "all"]:
        print(f"{name:<8}" + "".join(f"{scalars[f'sphere/{column}/{name}']:>16.3g}" for column in columns))
    equilibrium = scalars["sphere/angular_update_equilibrium/all"]
    lr, decay, momentum = (optimizer.defaults[key] for key in ("lr", "weight_decay", "momentum"))
    settling = (1 - momentum) / (2 * lr * decay)  # torch's momentum buffer carries the decay too
    print(f"SGD-M settles at an angular update of {equilibrium:.3g} after ~(1−μ)/(2ηλ) = {settling:,.0f} steps")
    print(f"\n{tensorboard_command(logdir)}")
    return scalars


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--logdir", help="log directory (default: a new lightning_logs/plain_torch-<date>-<time>)")
    arguments = parser.parse_args()
    main(arguments.steps, arguments.logdir)
