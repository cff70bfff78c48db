"""SphereMonitor on a small BatchNorm conv net: SGD with momentum, Adam and AdamSRT side by side in TensorBoard.

The net learns scikit-learn's bundled 8×8 handwritten digits (no download) three times: with SGD-M, with
Adam, and with Adam rewritten into AdamSRT by ``SphereMonitor(spherical_correction=True)``. The monitor
finds the radially invariant filters on the first step (every conv output channel feeds a BatchNorm),
prints them, and logs their effective learning rate, angular update and the rest of the spherical metrics
next to the loss and accuracy; the corrected run shows what S, R and T remove (``deformation_cos`` at 1).
About 10–15 seconds on two CPU cores::

    pip install lightning-sphere[examples]
    python examples/digits.py
    tensorboard --logdir lightning_logs
"""

from __future__ import annotations

import argparse
import warnings
from collections import OrderedDict
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_sphere import SphereMonitor

#: The runs, and the TensorBoard version each one logs to: "adamsrt" is Adam with the spherical correction.
OPTIMIZERS = ("sgdm", "adam", "adamsrt")
#: The monitor's numbers printed at the end, with their column titles.
HEADLINES = {
    "sphere/effective_lr/all": "effective lr",
    "sphere/angular_update/all": "angular update",
    "sphere/angular_update_equilibrium/all": "equilibrium",
    "sphere/deformation_cos/all": "deformation cos",
}

warnings.filterwarnings("ignore", ".*does not have many workers.*")  # the data set is tiny and in memory


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Conv → BatchNorm → ReLU: each output channel of the conv is a radially invariant group."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            bn=nn.BatchNorm2d(out_channels),
            relu=nn.ReLU(),
        )
    )


class DigitsClassifier(pl.LightningModule):
    """Three BatchNorm conv blocks and a linear classifier, for 8×8 digits.

    Args:
        optimizer: ``"sgdm"`` (lr 0.1, momentum 0.9) or ``"adam"``/``"adamsrt"`` (lr 1e-3), all with weight
            decay 5e-4; ``"adamsrt"`` is Adam, which ``SphereMonitor`` then corrects.
    """

    def __init__(self, optimizer: str = "sgdm") -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
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
        if self.hparams.optimizer == "sgdm":
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        return torch.optim.Adam(self.parameters(), lr=1e-3, weight_decay=5e-4)


def digits_loaders(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    """The 1,797 digits as ``(N, 1, 8, 8)`` images in [0, 1]: a training loader and an 80/20 held-out one."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    labels = torch.tensor(digits.target)
    x_train, x_val, y_train, y_val = train_test_split(images, labels, test_size=0.2, stratify=labels, random_state=0)
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=batch_size, shuffle=True)
    val = DataLoader(TensorDataset(x_val, y_val), batch_size=512)
    return train, val


def train(optimizer: str, max_epochs: int, root: str | Path) -> dict[str, float]:
    """Train one model with SphereMonitor attached.

    Returns:
        The final validation accuracy (``"val/acc"``) and the monitor's last logged metrics.
    """
    pl.seed_everything(0)  # the same initial weights and batches for both optimizers
    train_loader, val_loader = digits_loaders()
    monitor = SphereMonitor(spherical_correction=optimizer == "adamsrt")
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(save_dir=root, name="digits", version=optimizer, default_hp_metric=False),
        callbacks=[monitor],
        log_every_n_steps=5,  # 23 steps per epoch: a few dozen points over the run
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(DigitsClassifier(optimizer), train_loader, val_loader)
    return {"val/acc": trainer.callback_metrics["val/acc"].item(), **monitor.metrics}


def main(max_epochs: int = 8, root: str | Path = "lightning_logs") -> dict[str, dict[str, float]]:
    """Train with each optimizer, print the final numbers, and return them.

    Args:
        max_epochs: epochs per run.
        root: the TensorBoard log directory; runs go to ``<root>/digits/<optimizer>``.

    Returns:
        For each optimizer, its final validation accuracy (``"val/acc"``) and the monitor's last metrics.
    """
    results = {name: train(name, max_epochs, root) for name in OPTIMIZERS}
    print(f"\n{'optimizer':<10}{'val acc':>9}" + "".join(f"{title:>16}" for title in HEADLINES.values()))
    for name, result in results.items():
        cells = (f"{result[key]:.3g}" if key in result else "-" for key in HEADLINES)  # Adam has no equilibrium
        print(f"{name:<10}{result['val/acc']:>9.1%}" + "".join(f"{cell:>16}" for cell in cells))
    print(f"\ntensorboard --logdir {root}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=8)
    main(parser.parse_args().max_epochs)
