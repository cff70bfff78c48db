"""How many TensorBoard cards the monitor's default logging makes: scalar tags (one card each in the Scalars
tab), histogram tags and custom-scalars charts, for the demo's three-conv net and the CIFAR ResNet-18, under
SGD-M with weight decay, Adam with L2 decay and AdamW.

    python benchmarks/card_count.py    # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

if not __package__:  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.models import ResNet18
from lightning_sphere import SphereMonitor

OPTIMIZERS = {
    "SGD-M": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=5e-4),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=5e-2),
}


def three_conv() -> nn.Module:
    """The demo's shape: three conv → BatchNorm → ReLU blocks and a linear classifier (8×8 inputs)."""
    blocks = [nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())
              for c_in, c_out in ((1, 32), (32, 64), (64, 64))]  # fmt: skip
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(64 * 64, 10))


class Fit(pl.LightningModule):
    def __init__(self, net: nn.Module, optimizer, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.net, self.make, self.shape = net, optimizer, shape

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return self.make(self.parameters())

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(16, *self.shape, generator=g)
        return DataLoader(TensorDataset(x, torch.randint(0, 10, (16,), generator=g)), batch_size=8)


def count(net: nn.Module, optimizer, shape: tuple[int, ...], root: Path) -> tuple[int, int, str]:
    """(scalar tags under sphere/, histogram tags, custom-scalars charts per category: "training + per layer")
    after two logged steps."""
    logger = TensorBoardLogger(root, name="cards", version=0)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, log_every_n_steps=1, logger=logger,
                         callbacks=[SphereMonitor(log_every_n_steps=1, histogram_every_n_steps=1)],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(Fit(net, optimizer, shape))
    logger.finalize("success")
    events = EventAccumulator(str(root / "cards" / "version_0"), size_guidance={"tensors": 0}).Reload()
    tags = events.Tags()
    layout = events.Tensors("custom_scalars__config__")[-1]  # rewritten as the run's tags change: the last counts
    config = layout_pb2.Layout.FromString(layout.tensor_proto.string_val[0])
    charts = " + ".join(str(len(category.chart)) for category in config.category)
    return sum(t.startswith("sphere/") for t in tags["scalars"]), len(tags["histograms"]), charts


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_sphere"):
        logging.getLogger(name).setLevel(logging.WARNING)
    models = {"demo (3 conv layers)": (three_conv, (1, 8, 8)), "ResNet-18 (20 tracked)": (ResNet18, (3, 32, 32))}
    print("| model | optimizer | scalar cards | histogram cards | custom-scalars charts (training + per layer) |")
    print("|---|---|---:|---:|---:|")
    for model, (make, shape) in models.items():
        for name, optimizer in OPTIMIZERS.items():
            torch.manual_seed(0)
            with tempfile.TemporaryDirectory() as tmp:
                scalars, histograms, charts = count(make(), optimizer, shape, Path(tmp))
            print(f"| {model} | {name} | {scalars} | {histograms} | {charts} |")


if __name__ == "__main__":
    main()
