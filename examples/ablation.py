"""The paper's §4 ablation at small scale: one BatchNorm conv net, six optimizers, N seeds, one table.

SGD-M, SGD-M with the spherical correction (SGDMRT), Adam, AdamW, AdamS (Adam + ``"s"``) and AdamSRT (Adam +
``"srt"``) train the same net from the same initial weights, with the authors' hyper-parameters (docs/theory.md
§6.6: lr 0.1 and momentum 0.9 for SGD-M, lr 1e-3 and betas (0.9, 0.999) for the Adams, weight decay 5e-4, lr
divided by 10 at 1/3, 5/9 and 7/9 of training, batch 128) with the epochs scaled to the data. By default the
data are scikit-learn's bundled 8×8 digits (no download); ``--data-dir`` runs on a CIFAR-10 or SVHN copy of
yours instead (torchvision's loaders, ``download=False``: it never downloads). Prints, and writes to
``<logdir>/ablation.md``, the final test accuracy (mean ± std over seeds) and the final angular update
against the §7 equilibrium its hyper-parameters predict::

    pip install -e ".[examples,plot]"   # from a clone of the repository
    python examples/ablation.py                        # digits, 3 seeds, about 15 minutes on a busy 2-core CPU
    python examples/ablation.py --data-dir ~/data --dataset cifar10 --epochs 135
    lightning-sphere plot lightning_logs/ablation-<time> -o figures   # every run overlaid, one PNG per metric

``--equilibrium sgdm`` (or ``adamw``) instead trains one run long enough, at a constant lr, for the angular
update to settle at its §7 equilibrium, and draws the two (the figures of docs/guides/charts.md).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sphere import SphereMonitor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the examples' shared helpers, wherever this runs from
from example_utils import conv_block, mean_std

warnings.filterwarnings("ignore", ".*does not have many workers.*")  # the data are in memory


@dataclass(frozen=True)
class Config:
    """One optimizer of the ablation: torch's class, its arguments, and the monitor's correction."""

    label: str
    optimizer: type[torch.optim.Optimizer]
    kwargs: dict
    correction: bool | str = False


#: The authors' hyper-parameters (docs/theory.md §6.6), λ = 5e-4 (the top of their grid) for every optimizer. AdamW
#: decays by lr·λ per step (torch's convention), 5e-7 here: next to Adam's L2 term it barely decays at all.
SGDM = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
ADAM = {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 5e-4}
CONFIGS = {
    "sgdm": Config("SGD-M", torch.optim.SGD, SGDM),
    "sgdmrt": Config("SGDMRT (SGD-M + correction)", torch.optim.SGD, SGDM, True),
    "adam": Config("Adam", torch.optim.Adam, ADAM),
    "adamw": Config("AdamW", torch.optim.AdamW, ADAM),
    "adams": Config('AdamS (Adam + "s")', torch.optim.Adam, ADAM, "s"),
    "adamsrt": Config('AdamSRT (Adam + "srt")', torch.optim.Adam, ADAM, "srt"),
}
#: The authors divide the lr by 10 at epochs 135, 225 and 315 of 405: the same fractions of our epochs.
MILESTONES = (135 / 405, 225 / 405, 315 / 405)
BATCH_SIZE = 128
#: ``--equilibrium``: one long run at a constant lr and a weight decay large enough for the §7 equilibrium to be
#: reached within it: ηλ = 1e-3, settling after about (1 − μ)/(2ηλ) = 50 steps (SGD-M) and 1/(2ηλ) = 500 (AdamW).
EQUILIBRIUM = {
    "sgdm": Config("SGD-M", torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}),
    "adamw": Config("AdamW", torch.optim.AdamW, {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 1.0}),
}


class Classifier(pl.LightningModule):
    """Three BatchNorm conv blocks, a max-pool, global average pooling and a linear classifier (the digits
    demo's net, for any image size and channel count)."""

    def __init__(
        self, config: Config, in_channels: int, classes: int, steps: int, milestones: tuple[float, ...] = MILESTONES
    ) -> None:
        super().__init__()
        self.config, self.steps, self.milestones = config, steps, milestones
        self.block1 = conv_block(in_channels, 32)
        self.block2 = conv_block(32, 64)
        self.block3 = conv_block(64, 64)
        self.classifier = nn.Linear(64, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.max_pool2d(self.block2(self.block1(x)), 2)
        return self.classifier(self.block3(x).mean((2, 3)))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> dict:
        optimizer = self.config.optimizer(self.parameters(), **self.config.kwargs)
        milestones = [max(1, round(f * self.steps)) for f in self.milestones]
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def digits() -> tuple[TensorDataset, TensorDataset, int, int]:
    """scikit-learn's 1,797 8×8 digits in [0, 1], split 80/20 (stratified, fixed): train, test, channels, classes."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16
    labels = torch.tensor(data.target)
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=0.2, stratify=labels, random_state=0)
    return TensorDataset(x_train, y_train), TensorDataset(x_test, y_test), 1, 10


def torchvision_data(name: str, root: Path) -> tuple[TensorDataset, TensorDataset, int, int]:
    """CIFAR-10 or SVHN from ``root`` as torchvision lays them out, standardized per channel; never downloads.

    Raises:
        SystemExit: torchvision is not installed, or the data are not under ``root``.
    """
    try:
        import torchvision
    except Exception as err:  # not installed, or built for another torch (its C++ operators fail to load)
        raise SystemExit(f"--data-dir needs torchvision, built for this torch ({err})") from None
    try:
        if name == "cifar10":
            parts = [torchvision.datasets.CIFAR10(str(root), train=t, download=False) for t in (True, False)]
            arrays = [(torch.tensor(p.data).permute(0, 3, 1, 2), torch.tensor(p.targets)) for p in parts]
        else:
            parts = [torchvision.datasets.SVHN(str(root), split=s, download=False) for s in ("train", "test")]
            arrays = [(torch.tensor(p.data), torch.tensor(p.labels)) for p in parts]
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
        expected = "cifar-10-batches-py/" if name == "cifar10" else "train_32x32.mat and test_32x32.mat"
        raise SystemExit(
            f"no {name} under {root} ({err}); torchvision expects {expected} there. This script never downloads: "
            f"fetch the data yourself, or leave out --data-dir to run on the bundled digits"
        ) from None
    train_x = arrays[0][0].float() / 255
    mean, std = train_x.mean((0, 2, 3), keepdim=True), train_x.std((0, 2, 3), keepdim=True)
    (x0, y0), (x1, y1) = arrays
    return (
        TensorDataset((x0.float() / 255 - mean) / std, y0),
        TensorDataset((x1.float() / 255 - mean) / std, y1),
        3,
        10,
    )


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    """Top-1 accuracy on ``data`` in eval mode (BatchNorm's running statistics)."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(data, batch_size=1024):
            correct += int((model(x).argmax(1) == y).sum())
    return correct / len(data)


def train(
    name: str, seed: int, data: tuple[TensorDataset, TensorDataset, int, int], epochs: int, logdir: Path
) -> dict[str, float]:
    """One run; returns its test accuracy and the monitor's last angular update and equilibrium (all groups)."""
    train_set, test_set, channels, classes = data
    pl.seed_everything(seed, verbose=False)  # same seed, same initial weights and batches for every optimizer
    loader = DataLoader(train_set, batch_size=BATCH_SIZE, shuffle=True)
    model = Classifier(CONFIGS[name], channels, classes, steps=epochs * len(loader))
    monitor = SphereMonitor(spherical_correction=CONFIGS[name].correction)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(logdir, name=name, version=f"seed{seed}", default_hp_metric=False),
        callbacks=[monitor, LearningRateMonitor(log_momentum=True, log_weight_decay=True)],
        log_every_n_steps=4,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    metrics = monitor.metrics
    return {
        "test_acc": accuracy(model, test_set),
        "angular_update": metrics.get("sphere/angular_update/all", math.nan),
        "equilibrium": metrics.get("sphere/angular_update_equilibrium/all", math.nan),
    }


def equilibrium_figure(name: str, steps: int, logdir: Path, figure: Path) -> Path:
    """Train :data:`EQUILIBRIUM` ``name`` on digits for ``steps`` steps at a constant lr, then draw its measured
    angular update (all groups) against the §7 equilibrium, with the settling time (§7.2), to ``figure``."""
    config = EQUILIBRIUM[name]
    train_set, _, channels, classes = digits()
    pl.seed_everything(0, verbose=False)
    loader = DataLoader(train_set, batch_size=BATCH_SIZE, shuffle=True, drop_last=True)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(logdir, name="", version=name, default_hp_metric=False),
        callbacks=[SphereMonitor(), LearningRateMonitor(log_momentum=True, log_weight_decay=True)],
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Classifier(config, channels, classes, steps, milestones=()), loader)
    return draw_equilibrium(logdir, name, figure)


def draw_equilibrium(logdir: Path, name: str, figure: Path) -> Path:
    """The figure of :func:`equilibrium_figure` from the run's event files under ``logdir``."""
    from lightning_sphere.reporting.plot import metric_figure
    from lightning_sphere.reporting.runs import read_runs

    config = EQUILIBRIUM[name]
    fig = metric_figure(read_runs(logdir, progress=False), "angular_update", layers=["all"])
    fig.set_size_inches(7, 3.6)
    hyper = ", ".join(f"{k} {v}" for k, v in config.kwargs.items())
    fig.suptitle(f"{config.label} on digits, batch {BATCH_SIZE} ({hyper})", fontsize="medium")
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure)
    return figure


def table(results: dict[str, list[dict[str, float]]]) -> str:
    """The markdown table: test accuracy (%) and final angular update vs equilibrium, mean ± std over seeds."""
    lines = [
        "| optimizer | test accuracy (%) | final angular update (rad) | equilibrium (rad) | measured / equilibrium |",
        "|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        acc = mean_std([100 * r["test_acc"] for r in runs], ".2f")
        theta = mean_std([r["angular_update"] for r in runs], ".2e")
        eq = [r["equilibrium"] for r in runs]
        ratio = mean_std([r["angular_update"] / r["equilibrium"] for r in runs], ".2g")
        eq_cell = "–" if any(math.isnan(v) for v in eq) else f"{statistics.mean(eq):.2e}"
        lines.append(f"| {CONFIGS[name].label} | {acc} | {theta} | {eq_cell} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, float]]]:
    """Run the ablation; returns, per optimizer, one result per seed (see :func:`train`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per optimizer (default 3)")
    parser.add_argument("--epochs", type=int, default=30, help="epochs per run (default 30: 360 steps on digits)")
    parser.add_argument("--data-dir", type=Path, help="a CIFAR-10 or SVHN copy (torchvision layout); never downloaded")
    parser.add_argument("--dataset", choices=("cifar10", "svhn"), default="cifar10", help="with --data-dir")
    parser.add_argument("--logdir", type=Path, help="TensorBoard root (default lightning_logs/ablation-<time>)")
    parser.add_argument("--optimizers", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="one seed, one epoch of four batches: a smoke test")
    parser.add_argument(
        "--equilibrium",
        choices=list(EQUILIBRIUM),
        help="instead of the ablation: one long constant-lr run on digits and the figure of its angular update "
        "against the §7 equilibrium (--figure)",
    )
    parser.add_argument("--steps", type=int, default=2000, help="with --equilibrium (default 2000)")
    parser.add_argument("--figure", type=Path, help="with --equilibrium: the PNG to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.logdir is not None and args.logdir.exists() and any(args.logdir.iterdir()):
        raise SystemExit(f"{args.logdir} is not empty: give a fresh --logdir, so that runs are not mixed")
    if args.equilibrium:
        logdir = args.logdir or Path("lightning_logs") / time.strftime(f"equilibrium-{args.equilibrium}-%Y%m%d-%H%M%S")
        figure = args.figure or logdir / f"equilibrium_{args.equilibrium}.png"
        print(equilibrium_figure(args.equilibrium, 20 if args.quick else args.steps, logdir, figure))
        return {}
    seeds, epochs = (1, 1) if args.quick else (args.seeds, args.epochs)
    data = digits() if args.data_dir is None else torchvision_data(args.dataset, args.data_dir)
    if args.quick:  # four batches of training data, one of test data
        train_set, test_set, channels, classes = data
        data = (TensorDataset(*train_set[: 4 * BATCH_SIZE]), TensorDataset(*test_set[:BATCH_SIZE]), channels, classes)
    logdir = args.logdir or Path("lightning_logs") / time.strftime("ablation-%Y%m%d-%H%M%S")
    source = "digits (scikit-learn)" if args.data_dir is None else f"{args.dataset} ({args.data_dir})"
    print(f"ablation: {source}, {epochs} epochs, seeds 0..{seeds - 1}, logs in {logdir}")
    results = {name: [train(name, seed, data, epochs, logdir) for seed in range(seeds)] for name in args.optimizers}
    text = table(results)
    print(f"\n{text}\n\nlightning-sphere plot {logdir}")
    logdir.mkdir(parents=True, exist_ok=True)
    (logdir / "ablation.md").write_text(f"{source}, {epochs} epochs, {seeds} seed(s)\n\n{text}\n")
    return results


if __name__ == "__main__":
    main()
