"""SphereMonitor on a small BatchNorm conv net: SGD-M, AdamW, Adam and AdamSRT side by side in TensorBoard.

The net learns scikit-learn's bundled 8×8 handwritten digits (no download) four times, from the same initial
weights and batches: with SGD with momentum, AdamW, Adam (L2 decay), and Adam rewritten into AdamSRT by
``SphereMonitor(spherical_correction=True)``. The monitor finds the radially invariant filters on the first
step (every conv output channel feeds a BatchNorm) and logs their effective learning rate, angular update
and the other spherical metrics next to the loss and accuracy.

The weight decay of SGD-M and AdamW is large by the usual standards so that decay and growth balance within
the run: the norms settle in about (1−μ)/(2ηλ) = 50 steps for SGD-M (torch's momentum buffer carries the
decay too) and 1/(2ηλ) = 100 steps for AdamW, and a run is 230 steps. The table at the end gives the angular
update measured over the last quarter of each run beside the one §7 predicts, √(2ηλ/(1+μ)) for SGD-M and
√(2ηλ(1−β1)/(1+β1)) for AdamW. Adam's L2 decay is rescaled by its denominator, so no such value exists for
Adam; the corrected run shows what S, R and T remove (``deformation_cos`` at 1). Every invocation logs to a
new folder, and the command that shows it is printed at the end::

    pip install -e ".[examples]"   # from a clone of the repository
    python examples/digits.py            # --logdir DIR, --max-epochs N, --runs sgdm adamw …
    tensorboard --logdir lightning_logs/digits-<date>-<time>
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_sphere import SphereMonitor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the examples' shared helpers, wherever this runs from
from example_utils import conv_block, default_logdir, final_angular_update, quiet_lightning, tensorboard_command

#: Each run: the optimizer class, its hyper-parameters, and whether SphereMonitor corrects it (AdamSRT). SGD-M's
#: and AdamW's weight decay is large so that they settle well within the run (see the module's docstring).
RUNS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any], bool]] = {
    "sgdm": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}, False),
    "adamw": (torch.optim.AdamW, {"lr": 0.005, "betas": (0.9, 0.99), "weight_decay": 1.0}, False),
    "adam": (torch.optim.Adam, {"lr": 0.005, "betas": (0.9, 0.99), "weight_decay": 5e-4}, False),
    "adamsrt": (torch.optim.Adam, {"lr": 0.005, "betas": (0.9, 0.99), "weight_decay": 5e-4}, True),
}
#: Optimizer steps per logging step, and the share of the run at its end over which the final angular
#: update is measured (its RMS over those logging steps: the quantity §7 predicts).
LOG_EVERY = 5
FINAL_SHARE = 0.25

warnings.filterwarnings("ignore", ".*does not have many workers.*")  # the data set is tiny and in memory
warnings.filterwarnings("ignore", ".*LeafSpec.*")  # pytorch_lightning 2.6 on torch 2.13


class DigitsClassifier(pl.LightningModule):
    """Three BatchNorm conv blocks and a linear classifier, for 8×8 digits.

    Args:
        run: a key of :data:`RUNS`, which names the optimizer and its hyper-parameters.
    """

    def __init__(self, run: str = "sgdm") -> None:
        super().__init__()
        if run not in RUNS:
            raise ValueError(f"run must be one of {tuple(RUNS)}, got {run!r}")
        self.save_hyperparameters()
        self.block1 = conv_block(1, 32)
        self.block2 = conv_block(32, 64)
        self.block3 = conv_block(64, 64)
        self.classifier = nn.Linear(64, 10)
        self.loss = nn.CrossEntropyLoss()
        self.val_acc = MulticlassAccuracy(num_classes=10)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.max_pool2d(self.block2(self.block1(x)), 2)  # 8×8 → 4×4
        return self.classifier(self.block3(x).mean((2, 3)))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.loss(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", self.loss(logits, y))
        self.log("val/acc", self.val_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer, hyper_parameters, _ = RUNS[self.hparams.run]
        return optimizer(self.parameters(), **hyper_parameters)


def digits_loaders(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    """The 1,797 digits as ``(N, 1, 8, 8)`` images in [0, 1]: a training loader and an 80/20 held-out one."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    labels = torch.tensor(digits.target)
    x_train, x_val, y_train, y_val = train_test_split(images, labels, test_size=0.2, stratify=labels, random_state=0)
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=batch_size, shuffle=True)
    val = DataLoader(TensorDataset(x_val, y_val), batch_size=512)
    return train, val


def train(run: str, max_epochs: int, logdir: Path) -> tuple[dict[str, float], str]:
    """Train one model with SphereMonitor attached, logging to ``<logdir>/<run>``.

    Returns:
        The final validation accuracy (``"val/acc"``), the monitor's last logged metrics, the RMS angular
        update over the end of the run (``"final_angular_update"``, rad) and the optimizer steps taken
        (``"steps"``); and the monitor's summary table.
    """
    pl.seed_everything(0, verbose=False)  # the same initial weights and batches for every run
    train_loader, val_loader = digits_loaders()
    monitor = SphereMonitor(spherical_correction=RUNS[run][2])
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(save_dir=logdir, name="", version=run, default_hp_metric=False),
        # η, λ and μ in the logs: `lightning-sphere plot` draws the settling time of the equilibrium from them
        callbacks=[monitor, LearningRateMonitor(log_momentum=True, log_weight_decay=True)],
        log_every_n_steps=LOG_EVERY,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(DigitsClassifier(run), train_loader, val_loader)
    steps = trainer.global_step
    result = {
        "val/acc": trainer.callback_metrics["val/acc"].item(),
        **monitor.metrics,
        "final_angular_update": final_angular_update(logdir / run, steps, FINAL_SHARE),
        "steps": steps,
    }
    return result, monitor.summary()


#: The runs as the text names them.
LABELS = {"sgdm": "SGD-M", "adamw": "AdamW", "adam": "Adam", "adamsrt": "AdamSRT"}


def _names(runs: list[str]) -> str:
    """``SGD-M comes``, ``SGD-M and AdamW come``."""
    labels = [LABELS[run] for run in runs]
    return (" and ".join(labels) + " come") if len(labels) > 1 else f"{labels[0]} comes"


def describe(run: str) -> str:
    """The run's optimizer and hyper-parameters in one short line, e.g. ``SGD lr=0.1 momentum=0.9 …``."""
    optimizer, hyper_parameters, corrected = RUNS[run]
    name = "Adam → AdamSRT" if corrected else optimizer.__name__
    return " ".join([name, *(f"{key}={value}" for key, value in hyper_parameters.items())])


def main(
    max_epochs: int = 10, logdir: str | Path | None = None, runs: tuple[str, ...] = tuple(RUNS)
) -> dict[str, dict[str, float]]:
    """Train each run, print the monitor's summary once and a table of the final numbers, and return them.

    Args:
        max_epochs: epochs per run (23 optimizer steps each).
        logdir: the TensorBoard log directory, one sub-folder per run; ``None``: a new
            ``lightning_logs/digits-YYYYmmdd-HHMMSS``.
        runs: which keys of :data:`RUNS` to train.

    Returns:
        For each run, its final validation accuracy (``"val/acc"``), the monitor's last metrics, the RMS
        angular update over the last quarter of the run (``"final_angular_update"``, rad) and its ``"steps"``.
    """
    torch.set_num_threads(1)  # a small net: one thread is fastest, and immune to a busy second core
    logdir = Path(logdir) if logdir is not None else default_logdir("digits")
    used = [run for run in runs if any((logdir / run).glob("events.out.tfevents.*"))]
    if used:  # TensorBoard would draw both invocations as one line, and the table would read both
        raise ValueError(
            f"{logdir / used[0]} already holds a run's event files: give a --logdir that is new (or none: the demo "
            "makes a new folder each time)"
        )
    results, summary = {}, ""
    for run in runs:
        start = time.perf_counter()
        print(f"training {run:<8}", end="", flush=True)
        with quiet_lightning(), warnings.catch_warnings(record=True) as said:  # told below the run's line
            results[run], run_summary = train(run, max_epochs, logdir)
        summary = summary or run_summary  # the first run's: the same groups in every run
        print(f"{time.perf_counter() - start:5.1f} s  {describe(run)}")
        for warning in said:
            print(textwrap.fill(str(warning.message), 116, initial_indent="  ! ", subsequent_indent="    "))
    print(
        f"\nWhat the monitor tracks, as it told the {runs[0]} run (the same modules in every run; a run's ! lines"
        "\nsay what it saw there). max|cos(g,x)|: how far each module's gradient was from orthogonal to its weights"
        f"\non the first step, 0 for an exact invariance (docs/guides/detection.md).\n\n{summary}\n"
    )
    steps = results[runs[0]]["steps"]
    last = f"last {FINAL_SHARE:.0%}"
    print(f"After {steps} steps; angular update: RMS over the {last} of the run, all tracked groups (rad/step)")
    print(f"{'run':<9}{'val acc':>8}{'angular update':>16}{'predicted (§7)':>16}{'effective lr (*)':>18}")
    for run, result in results.items():
        predicted = result.get("sphere/angular_update_equilibrium/all")  # none for Adam with L2 decay
        cells = (
            f"{result['val/acc']:>8.1%}",
            f"{result['final_angular_update']:>16.4f}",
            f"{predicted:>16.4f}" if predicted is not None else f"{'none':>16}",
            f"{result['sphere/effective_lr/all']:>18.3g}",
        )
        print(f"{run:<9}" + "".join(cells))
    settling = [run for run, result in results.items() if "sphere/angular_update_equilibrium/all" in result]
    adam = any(RUNS[run][0] is not torch.optim.SGD for run in runs)
    print(
        "\n(*) the step on the unit sphere per unit of gradient there (rad per unit of ‖∇L(u)‖, median over groups,"
        "\n    last logged step): η/r² for SGD, η/(r² b) for Adam, b = √v̂ + ε its denominator — not the scheduled lr"
        + (
            ".\n    Adam's divides by b, the typical size of the gradient's entries, small here, and by r² < 1: hence"
            "\n    values far above the lr (docs/theory.md §3.2)."
            if adam
            else "\n    (docs/theory.md §3.2)."
        )
    )
    if len(settling) < len(results):
        print("predicted (§7): none where docs/theory.md §7 has no equilibrium (Adam with L2 weight decay).")
    shows = "What this demo shows: each optimizer's steps on the sphere" + (
        f", and how close {_names(settling)} to {'their' if len(settling) > 1 else 'its'} §7 equilibrium."
        if settling
        else "."
    )
    does_not = (
        "What it does not: which optimizer trains best — digits is small, the runs short, one seed; the ablation "
        "(docs/guides/correction.md) runs several."
    )
    print(textwrap.fill(shows, 108) + "\n" + textwrap.fill(does_not, 108))
    print(f"\n{tensorboard_command(logdir)}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=10, help="epochs per run, 23 steps each (default 10)")
    parser.add_argument("--logdir", help="log directory (default: a new lightning_logs/digits-<date>-<time>)")
    parser.add_argument("--runs", nargs="+", choices=tuple(RUNS), default=tuple(RUNS), help="runs to train")
    arguments = parser.parse_args()
    try:
        main(arguments.max_epochs, arguments.logdir, tuple(arguments.runs))
    except ValueError as error:
        parser.error(str(error))
