"""Models for the FSDP2 tests: their layers' rows split unevenly over two ranks (groups spanning ranks, a rank
holding zero rows), with per-sample normalizations only, so that two ranks on half batches compute what one
process computes on the whole batch."""

from __future__ import annotations

import os
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

#: The suite's seed (tests/conftest.py), read here too: the ranks are fresh processes that do not run conftest.
SEED = int(os.environ.get("LIGHTNING_SPHERE_TEST_SEED", "0"))


class ConvNet(nn.Module):
    """Per-channel groups (InstanceNorm: 5 rows, 3 on rank 0 and 2 on rank 1), channel groups of a GroupNorm
    (6 rows in 3 groups of 2: the middle group spans the ranks), a one-row layer (rank 1 holds none), and a
    normalized layer whose weight is also used outside it where its gradient does not show it (times zero):
    only the graph tells it is not invariant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3)
        self.norm1 = nn.GroupNorm(3, 6)
        self.conv2 = nn.Conv2d(6, 5, 3, bias=False)
        self.norm2 = nn.InstanceNorm2d(5, affine=True)
        self.conv3 = nn.Conv2d(5, 1, 1)
        self.norm3 = nn.InstanceNorm2d(1, affine=True)
        self.side = nn.Conv2d(5, 2, 1, bias=False)
        self.side_norm = nn.InstanceNorm2d(2)
        self.head = nn.Linear(18, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(x)))
        x = F.relu(self.norm2(self.conv2(x)))
        side = F.relu(self.side_norm(self.side(x))).mean((2, 3))
        x = F.relu(self.norm3(self.conv3(x)))
        return self.head(torch.cat([x.flatten(1), side], 1)) + 0 * self.side.weight.sum()

    def shard(self, mesh: Any, fully_shard: Any) -> None:
        for layer in (self.conv1, self.conv2, self.conv3):
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh, reshard_after_forward=True)  # side's weight is DTensor again after forward


class GroupedTranspose(nn.Module):
    """A grouped ConvTranspose (output channel = (group, dim 1) of its weight) before an InstanceNorm: FSDP2's
    shards of dim 0 cut across its channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.up = nn.ConvTranspose2d(2, 4, 3, groups=2)
        self.norm = nn.InstanceNorm2d(4, affine=True)
        self.head = nn.Linear(256, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.norm(self.up(F.relu(self.conv(x))))).flatten(1))

    def shard(self, mesh: Any, fully_shard: Any) -> None:
        fully_shard(self.up, mesh=mesh)
        fully_shard(self, mesh=mesh)


class Block(nn.Module):
    """A pre-norm transformer block: QK-normed attention (3 heads of 2: q and k have 6 rows, the middle head
    spans the ranks), a LayerNorm'd up-projection (one group of 5 rows over both ranks) and a one-row scoring
    layer normalized over the tokens (rank 1 holds none of it)."""

    def __init__(self, d: int = 8, heads: int = 3, head_dim: int = 2, hidden: int = 5, tokens: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.ln = nn.LayerNorm(d)
        self.q = nn.Linear(d, heads * head_dim, bias=False)
        self.k = nn.Linear(d, heads * head_dim, bias=False)
        self.v = nn.Linear(d, heads * head_dim)
        self.q_norm = nn.RMSNorm(head_dim)
        self.k_norm = nn.RMSNorm(head_dim)
        self.o = nn.Linear(heads * head_dim, d)
        self.up = nn.Linear(d, hidden)
        self.up_norm = nn.LayerNorm(hidden)
        self.down = nn.Linear(hidden, d)
        self.score = nn.Linear(d, 1, bias=False)  # the norm would cancel a bias: Adam would amplify round-off
        self.score_norm = nn.LayerNorm(tokens)
        self.head = nn.Linear(d + tokens, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.ln(x)
        q = self.q_norm(self.q(h).view(b, t, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k(h).view(b, t, self.heads, self.head_dim)).transpose(1, 2)
        v = self.v(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)
        x = x + self.o(a)
        x = x + self.down(F.gelu(self.up_norm(self.up(x))))
        scores = self.score_norm(self.score(x).squeeze(-1))
        return self.head(torch.cat([x.mean(1), scores], 1))

    def shard(self, mesh: Any, fully_shard: Any) -> None:
        for layer in (self.q, self.k, self.up, self.score):
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


class Fused(nn.Module):
    """timm's EVA attention (issue 25): ``F.linear(h, self.qkv.weight, cat(q_bias, k_bias, v_bias))``, ``qkv`` never
    called, per-head RMSNorms on q and k: the q rows of each head (3 heads of 2) tracked with the entries of
    ``q_bias`` (a parameter of this module, not of the Linear) added to them; q_bias's 6 entries split 3 and 3
    over the ranks, the weight's 18 rows 9 and 9."""

    def __init__(self, d: int = 8, heads: int = 3, head_dim: int = 2) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * heads * head_dim, bias=False)
        self.q_bias = nn.Parameter(torch.randn(heads * head_dim) * 0.1)
        self.register_buffer("k_bias", torch.zeros(heads * head_dim))
        self.v_bias = nn.Parameter(torch.randn(heads * head_dim) * 0.1)
        self.q_norm = nn.RMSNorm(head_dim)
        self.k_norm = nn.RMSNorm(head_dim)
        self.head = nn.Linear(heads * head_dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(self.ln(x), self.qkv.weight, bias).view(b, t, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v).transpose(1, 2).reshape(b, t, -1)
        return self.head(a.mean(1))

    def shard(self, mesh: Any, fully_shard: Any) -> None:
        fully_shard(self, mesh=mesh)


def conv_data(n: int = 32) -> TensorDataset:
    gen = torch.Generator().manual_seed(SEED * 1_000_003 + 3)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen))


def token_data(n: int = 32) -> TensorDataset:
    gen = torch.Generator().manual_seed(SEED * 1_000_003 + 4)
    return TensorDataset(torch.randn(n, 4, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen))


class Module(pl.LightningModule):
    """``net`` ("conv", "block", "transpose" or "fused") trained with ``optimizer`` ("sgd": SGD with momentum and
    weight decay, "adamw", "plain": SGD without momentum); ``shard``: apply FSDP2 in ``configure_model``."""

    def __init__(self, net: str = "conv", optimizer: str = "sgd", batch_size: int = 8, shard: bool = True) -> None:
        super().__init__()
        torch.manual_seed(SEED)  # the same weights in every process
        self.kind = net
        self.net = {"conv": ConvNet, "block": Block, "transpose": GroupedTranspose, "fused": Fused}[net]()
        self.optimizer_name, self.batch_size, self.sharded = optimizer, batch_size, shard

    def configure_model(self) -> None:
        if not self.sharded:
            return
        mesh = self.device_mesh
        if mesh["tensor_parallel"].size() > 1:  # Megatron-style MLP: up column-wise, down row-wise (Shard(1))
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            parallelize_module(self.net, mesh["tensor_parallel"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
        if mesh["data_parallel"].size() > 1:
            from torch.distributed.fsdp import fully_shard

            self.net.shard(mesh["data_parallel"], fully_shard)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        params = self.parameters()
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        if self.optimizer_name == "plain":
            return torch.optim.SGD(params, lr=0.1, weight_decay=1e-2)
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2)

    def train_dataloader(self) -> DataLoader:
        """Batch k holds samples ``[b·k, b·(k+1))`` of the data in one process; on W ranks, rank r's batch k
        holds its r-th part (no sampler: the global batch is the single-process batch of W·b samples)."""
        data = token_data() if self.kind in ("block", "fused") else conv_data()
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if world > 1:
            b = self.batch_size
            data = Subset(data, [i for i in range(len(data)) if (i // b) % world == rank])
        return DataLoader(data, batch_size=self.batch_size)
