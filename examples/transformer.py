"""SphereMonitor on a small normalized transformer: AdamW and Muon compared on the sphere.

A byte-level language model (vocabulary 256) learns the standard library's own ``.py`` sources, which every
Python installation ships (nothing is downloaded): the top-level modules next to ``os.py``, sorted by name and
concatenated to :data:`DATA_BYTES` bytes, the first 90% for training and the last 10% (other modules) held out.
The model is plain ``torch.nn``: token and position embeddings, pre-norm blocks (``nn.RMSNorm``) of causal
self-attention with QK-norm (an ``nn.RMSNorm(head_dim)`` on each head of q and of k) and a GELU MLP, a final
RMSNorm and an untied head. Under QK-norm scaling a head's rows of the q (or k) projection changes nothing, so
``SphereMonitor`` finds one radially invariant group per head of every ``blocks.<i>.attn.q`` and ``.k`` and
logs how each optimizer turns them, step by step.

Two runs, from the same initial weights and batches:

- ``adamw``: ``torch.optim.AdamW`` on everything, weight decay on the matrices (embeddings, projections,
  head), none on the norms' gains;
- ``muon``: ``torch.optim.Muon`` on the blocks' hidden matrices (q, k, v, out, the MLP's two), AdamW as above
  on the embeddings, the gains and the head. Two optimizers: the LightningModule steps both itself (manual
  optimization), and would step any scheduler you give them.

The learning rates are constant (the §7 and §8.2 equilibria the table compares with assume fixed hyper-parameters,
and ``lightning-sphere plot`` reads the settling time 1/(2ηλ) from the first logged lr, which a warm-up would
make too long). A ``LearningRateMonitor`` logs η, λ and the momentum for the figures. Every invocation logs to a
new folder; the commands that show it are printed at the end::

    python examples/transformer.py                # --steps N, --runs adamw muon, --seed S, --logdir DIR
    tensorboard --logdir lightning_logs/transformer-<date>-<time>
    lightning-sphere plot lightning_logs/transformer-<date>-<time> -o lightning_logs/transformer-<…>/figures

``torch.optim.Muon`` needs torch 2.9 or later; the ``adamw`` run alone works on any torch the package supports.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_sphere import SphereMonitor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the examples' shared helpers, wherever this runs from
from example_utils import default_logdir, final_angular_update, plot_command, quiet_lightning, tensorboard_command

#: Bytes of standard-library source text, of which the last :data:`VALIDATION_SHARE` are held out.
DATA_BYTES = 2_000_000
VALIDATION_SHARE = 0.1
#: AdamW for a small transformer: β2 = 0.95 (a second moment that follows the gradient scale, as usual for
#: transformers), decoupled weight decay 0.1 on the matrices only.
ADAMW = {"lr": 3e-3, "betas": (0.9, 0.95), "weight_decay": 0.1}
#: Muon as Keller Jordan tuned it (lr 0.02, Nesterov momentum 0.95), with ``adjust_lr_fn="original"``: the lr
#: is scaled by √max(1, rows/cols), 1 for the square q, k, v, out and the MLP's down projection and 2 for its
#: 4×-wide up projection, so 0.02 is the step of the matrices the monitor tracks. ("match_rms_adamw" would
#: scale it by 0.2·√max(rows, cols), 1.6 for the square ones and 3.2 for the MLP's, and is meant for reusing
#: AdamW's lr rather than Muon's.) Its weight decay, like AdamW's, shrinks the weights by lr·λ per step.
MUON = {"lr": 0.02, "momentum": 0.95, "weight_decay": 0.1, "adjust_lr_fn": "original"}
RUNS = ("adamw", "muon")
#: Optimizer steps per logging step, and the share of the run at its end over which the final angular update
#: is measured (its RMS over those logging steps, each itself an RMS over the tracked groups).
LOG_EVERY = 10
FINAL_SHARE = 0.25

warnings.filterwarnings("ignore", ".*does not have many workers.*")  # the data are in memory
warnings.filterwarnings("ignore", ".*LeafSpec.*")  # pytorch_lightning 2.6 on torch 2.13
# LearningRateMonitor warns when some optimizers have `momentum` and others `betas` (Muon and AdamW), though it
# logs both
warnings.filterwarnings("ignore", ".*some optimizers do not have momentum.*")


@dataclass(frozen=True)
class Config:
    """The model's and the data's sizes (the defaults: 0.14 M parameters, about 5 s per 100 steps on one
    CPU thread)."""

    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    context: int = 64
    batch_size: int = 32
    data_bytes: int = DATA_BYTES

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")


# ---------------------------------------------------------------------------------------------------- the data


def stdlib_bytes(num_bytes: int = DATA_BYTES) -> tuple[bytes, list[Path]]:
    """The first ``num_bytes`` of the standard library's top-level ``.py`` files (next to ``os.py``), sorted by
    name and concatenated, and the files that went into them. The same text for every run of one Python
    version.

    Raises:
        SystemExit: this Python ships fewer source bytes (an embedded build with ``.pyc`` files only, say).
    """
    root = Path(os.__file__).parent
    text, used = bytearray(), []
    for path in sorted(root.glob("*.py")):
        if len(text) >= num_bytes:
            break
        text += path.read_bytes()
        used.append(path)
    if len(text) < num_bytes:
        raise SystemExit(f"{root} holds {len(text):,} bytes of .py sources, fewer than the {num_bytes:,} asked for")
    return bytes(text[:num_bytes]), used


class Windows(Dataset):
    """Windows of ``context + 1`` tokens starting at ``starts``: inputs and next-token targets."""

    def __init__(self, tokens: Tensor, starts: Tensor, context: int) -> None:
        self.tokens, self.starts, self.context = tokens, starts, context

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        window = self.tokens[int(self.starts[i]) :][: self.context + 1]
        return window[:-1], window[1:]


def loaders(config: Config, steps: int, seed: int, split: int | None = None) -> tuple[DataLoader, DataLoader]:
    """Byte tokens of :func:`stdlib_bytes`: a training loader of ``steps`` batches of windows drawn at random
    positions of the first 90% (one epoch, fixed by ``seed``: every run sees the same batches in the same
    order), and a validation loader of every non-overlapping window of the last 10%. ``split``: the bytes that
    train instead of the first 90% (``transformer_lm.py`` ends them on a file boundary), the rest held out."""
    text, _ = stdlib_bytes(config.data_bytes)
    tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    split = round(len(tokens) * (1 - VALIDATION_SHARE)) if split is None else split
    train, val = tokens[:split], tokens[split:]
    width = config.context + 1
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(train) - width + 1, (steps * config.batch_size,), generator=generator)
    val_starts = torch.arange(0, len(val) - width + 1, config.context)
    return (
        DataLoader(Windows(train, starts, config.context), batch_size=config.batch_size),
        DataLoader(Windows(val, val_starts, config.context), batch_size=256),
    )


# --------------------------------------------------------------------------------------------------- the model


class Attention(nn.Module):
    """Causal self-attention with QK-norm: q and k are RMS-normalized per head before the dot product, which
    makes each head's rows of ``q`` and of ``k`` a radially invariant group."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim)
        self.k_norm = nn.RMSNorm(self.head_dim)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        heads = (batch, length, self.n_heads, self.head_dim)
        q = self.q_norm(self.q(x).view(heads)).transpose(1, 2)  # (batch, head, position, head_dim)
        k = self.k_norm(self.k(x).view(heads)).transpose(1, 2)
        v = self.v(x).view(heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, length, width))


class MLP(nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, 4 * d_model, bias=False)
        self.down = nn.Linear(4 * d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(d_model)
        self.attn = Attention(d_model, n_heads)
        self.mlp_norm = nn.RMSNorm(d_model)
        self.mlp = MLP(d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TinyTransformer(nn.Module):
    """A byte-level causal language model: embeddings, ``n_layers`` blocks, a final RMSNorm, an untied head."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, config.d_model)
        self.position = nn.Embedding(config.context, config.d_model)
        self.blocks = nn.ModuleList(Block(config.d_model, config.n_heads) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model)
        self.head = nn.Linear(config.d_model, 256, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


# ---------------------------------------------------------------------------------------------- the optimizers


def hidden_matrices(model: TinyTransformer) -> list[nn.Parameter]:
    """The blocks' 2-D weights (q, k, v, out, the MLP's up and down): what Muon steps in the ``muon`` run."""
    return [p for p in model.blocks.parameters() if p.ndim == 2]


def adamw_groups(params: list[tuple[str, nn.Parameter]]) -> list[dict[str, Any]]:
    """AdamW's two param groups: weight decay on the matrices, none on the norms' gains (1-D)."""
    return [
        {"params": [p for _, p in params if p.ndim >= 2], "weight_decay": ADAMW["weight_decay"]},
        {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def muon_class() -> type[torch.optim.Optimizer]:
    """``torch.optim.Muon``.

    Raises:
        SystemExit: this torch has none (it came with torch 2.9).
    """
    muon = getattr(torch.optim, "Muon", None)
    if muon is None:
        raise SystemExit(f"the muon run needs torch.optim.Muon (torch 2.9 or later); this is torch {torch.__version__}")
    return muon


def make_optimizers(run: str, model: TinyTransformer) -> list[torch.optim.Optimizer]:
    """``adamw``: one AdamW; ``muon``: Muon on :func:`hidden_matrices`, AdamW on every other parameter."""
    adamw = {key: value for key, value in ADAMW.items() if key != "weight_decay"}
    if run == "adamw":
        return [torch.optim.AdamW(adamw_groups(list(model.named_parameters())), **adamw)]
    muon = muon_class()
    hidden = {id(p) for p in hidden_matrices(model)}
    rest = [(name, p) for name, p in model.named_parameters() if id(p) not in hidden]
    return [muon(hidden_matrices(model), **MUON), torch.optim.AdamW(adamw_groups(rest), **adamw)]


def describe(run: str) -> str:
    """The run's optimizers and hyper-parameters in one short line."""
    adamw = "AdamW " + " ".join(f"{key}={value}" for key, value in ADAMW.items())
    if run == "adamw":
        return f"{adamw} (no decay on the gains)"
    muon = " ".join(f"{key}={value}" for key, value in MUON.items())
    return f"Muon {muon} on the blocks' matrices; {adamw} on the rest"


class ByteLM(TinyTransformer, pl.LightningModule):
    """:class:`TinyTransformer` as a LightningModule (its layers at the top, so that the charts are named
    ``blocks.0.attn.q``, …), trained with one or two optimizers stepped by hand (manual optimization). A
    subclass with other runs names them in :attr:`runs` and makes their optimizers in ``configure_optimizers``."""

    runs: tuple[str, ...] = RUNS

    def __init__(self, run: str, config: Config, steps: int) -> None:
        if run not in self.runs:
            raise ValueError(f"run must be one of {self.runs}, got {run!r}")
        super().__init__(config)
        self.save_hyperparameters({"run": run, "steps": steps, **asdict(config)})
        self.automatic_optimization = False
        self.run_name = run

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        schedulers = self.lr_schedulers()  # none here (constant lr); one you add is stepped below
        schedulers = schedulers if isinstance(schedulers, list) else [] if schedulers is None else [schedulers]
        loss = self.loss(batch)
        for optimizer in optimizers:
            optimizer.zero_grad()
        self.manual_backward(loss)
        for optimizer in optimizers:
            optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val/loss", self.loss(batch))  # averaged over the batches, weighted by their size

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return make_optimizers(self.run_name, self)


# --------------------------------------------------------------------------------------------------- the runs


def train(
    run: str,
    steps: int,
    config: Config,
    seed: int,
    logdir: Path,
    *,
    module_class: type[ByteLM] = ByteLM,
    spherical_correction: bool | str = False,
    version: str | None = None,
    split: int | None = None,
) -> tuple[dict[str, Any], str]:
    """Train one run with SphereMonitor attached, logging to ``<logdir>/<version>`` (default ``<logdir>/<run>``).

    ``module_class`` (a :class:`ByteLM` whose :attr:`~ByteLM.runs` hold ``run``), the monitor's
    ``spherical_correction`` and the training bytes ``split`` (see :func:`loaders`) are for
    ``transformer_lm.py``; this example keeps the defaults.

    Returns:
        The run's result (see :func:`main`) and the monitor's summary table.
    """
    version = run if version is None else version
    pl.seed_everything(seed, verbose=False)  # the same initial weights for every run
    train_loader, val_loader = loaders(config, steps, seed, split)
    monitor = SphereMonitor(log_every_n_steps=LOG_EVERY, spherical_correction=spherical_correction)
    trainer = pl.Trainer(
        # one epoch is the run, `steps` batches: under manual optimization Lightning counts global_step (and
        # max_steps) per optimizer step, twice per batch in the muon run
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(save_dir=logdir, name="", version=version, default_hp_metric=False),
        callbacks=[monitor, LearningRateMonitor(log_momentum=True, log_weight_decay=True)],
        log_every_n_steps=LOG_EVERY,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = module_class(run, config, steps)
    start = time.perf_counter()
    trainer.fit(module, train_loader, val_loader)  # validation once, at the end of the one epoch
    seconds = time.perf_counter() - start
    result = {
        "val/loss": trainer.callback_metrics["val/loss"].item(),
        "train/loss": trainer.callback_metrics["train/loss"].item(),
        **monitor.metrics,
        "final_angular_update": final_angular_update(logdir / version, steps, FINAL_SHARE),
        "steps": trainer.fit_loop.epoch_loop._batches_that_stepped,  # the step loggers see (not global_step)
        "seconds": seconds,
        "tracked": {g.module_name: (g.num_groups, g.group_size, g.norm_name) for g in monitor.groups},
    }
    return result, monitor.summary()


def main(
    steps: int = 1000,
    logdir: str | Path | None = None,
    runs: tuple[str, ...] = RUNS,
    seed: int = 0,
    config: Config = Config(),
) -> dict[str, dict[str, Any]]:
    """Train each run, print the monitor's summary once and a table of the final numbers, and return them.

    Args:
        steps: optimizer steps per run (batches: the ``muon`` run steps both its optimizers on each).
        logdir: the TensorBoard log directory, one sub-folder per run; ``None``: a new
            ``lightning_logs/transformer-YYYYmmdd-HHMMSS``.
        runs: which of :data:`RUNS` to train.
        seed: the initial weights and the batches (the same for every run).
        config: the model's and the data's sizes.

    Returns:
        For each run: the final validation loss and the last batch's training loss (``"val/loss"``,
        ``"train/loss"``, nats per byte), the monitor's last logged metrics (``"sphere/…"``), the RMS angular
        update over the last quarter of the run (``"final_angular_update"``, rad), the ``"steps"`` taken, the
        training time (``"seconds"``) and what the monitor tracked (``"tracked"``: module → (groups, group
        size, normalization)).
    """
    torch.set_num_threads(1)  # a small net: one thread is fastest, and immune to a busy second core
    logdir = Path(logdir) if logdir is not None else default_logdir("transformer")
    text, files = stdlib_bytes(config.data_bytes)
    print(
        f"data: {len(text):,} bytes of {len(files)} standard-library modules ({files[0].name} … {files[-1].name} in "
        f"{files[0].parent}), the last {VALIDATION_SHARE:.0%} held out; {steps} steps of {config.batch_size}×"
        f"{config.context} bytes"
    )
    results, summary = {}, ""
    for run in runs:
        print(f"training {run:<6}", end="", flush=True)
        with quiet_lightning():
            results[run], run_summary = train(run, steps, config, seed, logdir)
        summary = summary or run_summary  # the first run's: the same groups in every run
        print(f"{results[run]['seconds']:6.1f} s  {describe(run)}")
    print(f"\n{summary}\n")
    last = f"last {FINAL_SHARE:.0%}"
    print(f"After {steps} steps; angular update: RMS over the {last} of the run, all tracked groups (rad/step)")
    print(f"{'run':<7}{'val loss':>9}{'bits/byte':>10}{'angular update':>16}{'equilibrium (§7, §8)':>22}")
    for run, result in results.items():
        equilibrium = result.get("sphere/angular_update_equilibrium/all")
        cells = (
            f"{result['val/loss']:>9.3f}",
            f"{result['val/loss'] / math.log(2):>10.3f}",
            f"{result['final_angular_update']:>16.4f}",
            f"{equilibrium:>22.4f}" if equilibrium is not None else f"{'none':>22}",
        )
        print(f"{run:<7}" + "".join(cells))
    print(f"\n{tensorboard_command(logdir)}\n{plot_command(logdir)}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps per run (default 1000)")
    parser.add_argument("--logdir", help="log directory (default: a new lightning_logs/transformer-<date>-<time>)")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=RUNS, help="runs to train (default: both)")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and batches (default 0)")
    parser.add_argument("--d-model", type=int, default=Config.d_model, help=f"default {Config.d_model}")
    parser.add_argument("--n-heads", type=int, default=Config.n_heads, help=f"default {Config.n_heads}")
    parser.add_argument("--n-layers", type=int, default=Config.n_layers, help=f"default {Config.n_layers}")
    parser.add_argument("--context", type=int, default=Config.context, help=f"default {Config.context}")
    parser.add_argument("--batch-size", type=int, default=Config.batch_size, help=f"default {Config.batch_size}")
    arguments = parser.parse_args()
    sizes = Config(arguments.d_model, arguments.n_heads, arguments.n_layers, arguments.context, arguments.batch_size)
    main(arguments.steps, arguments.logdir, tuple(arguments.runs), arguments.seed, sizes)
