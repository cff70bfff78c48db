"""Weights followed through their own uses, not their module's calls (issue 25, kinds 1, 4 and 5), each against a
functional ground truth written here.

- kind 1: a weight used outside its module (``F.linear(x, self.qkv.weight, bias)``, the bias built on the spot);
- kind 5: embedding rows that feed a normalization alone;
- kind 4: normalizations written with other operations (ReLU linear attention: ``q·(kᵀ[v, 1])``, divided by its
  last column plus eps).

The ground truth never asks the package: a float64 copy of the model, every eps tiny, has the rows a test names
(with the bias entries the test names) multiplied by 2, by 0.5 and by a random factor per group; the groups are
invariant iff the output does not move.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sphere import SphereMonitor, find_invariant_groups
from lightning_sphere.core.groups import ParamSlice
from tests.lightning_helpers import fit

HEADS, HEAD_DIM = 2, 4
WIDTH = HEADS * HEAD_DIM
TOKENS = torch.randn(2, 5, WIDTH, generator=torch.Generator().manual_seed(0))


def moves(model: nn.Module, x: Tensor, groups: list[list[tuple[str, list[int]]]]) -> bool:
    """Whether scaling each group (a list of ``(parameter, entries of dim 0)``) by its own factor moves the
    output of a float64 copy of ``model`` with every eps tiny: all groups by 2, by 0.5, then by random factors."""
    twin = copy.deepcopy(model).double().train()
    for module in twin.modules():
        if isinstance(getattr(module, "eps", None), float):
            module.eps = 1e-30
    x = x.double() if x.is_floating_point() else x
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        reference = twin(x)
        for factors in ([2.0] * len(groups), [0.5] * len(groups), (torch.rand(len(groups), generator=gen) + 0.5)):
            saved = {name: p.clone() for name, p in twin.named_parameters()}
            for group, factor in zip(groups, factors, strict=True):
                for name, entries in group:
                    twin.get_parameter(name)[entries] *= float(factor)
            moved = not torch.allclose(twin(x), reference, rtol=1e-9, atol=1e-12)
            for name, p in twin.named_parameters():
                p.copy_(saved[name])
            if moved:
                return True
    return False


def heads(rows: range, *params: str) -> list[list[tuple[str, list[int]]]]:
    """One group per head among ``rows`` (``HEAD_DIM`` consecutive rows each), the same rows of every parameter."""
    blocks = [list(rows)[i : i + HEAD_DIM] for i in range(0, len(rows), HEAD_DIM)]
    return [[(p, block) for p in params] for block in blocks]


def found(model: nn.Module, x: Tensor) -> tuple[dict[str, tuple[int, tuple[ParamSlice, ...]]], dict[str, str]]:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = find_invariant_groups(model, x)
    return {g.module_name: (g.num_groups, g.slices) for g in groups}, groups.rejected


def rows_of(piece: ParamSlice) -> list[int]:
    """The rows of dim 0 a slice holds, in the order the groups take them."""
    index = torch.arange(piece.param.shape[0])
    return [int(i) for i in piece._shaped(index).flatten()]


# --- kind 1: a weight used outside its module -----------------------------------------------------------------


class BuiltBias(nn.Module):
    """timm's EVA attention: ``F.linear(x, self.qkv.weight, cat(q_bias, k_bias, v_bias))``, ``k_bias`` a zero
    buffer, per-head LayerNorms on q and k; ``qkv`` itself is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH, bias=False)
        self.q_bias = nn.Parameter(torch.randn(WIDTH))
        self.register_buffer("k_bias", torch.zeros(WIDTH))
        self.v_bias = nn.Parameter(torch.randn(WIDTH))
        self.q_norm, self.k_norm = nn.LayerNorm(HEAD_DIM), nn.LayerNorm(HEAD_DIM)
        self.proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.reshape(b, t, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(out.transpose(1, 2).reshape(b, t, WIDTH))


def test_a_weight_used_outside_its_module_is_followed_with_the_bias_built_for_it():
    model = BuiltBias()
    groups, rejected = found(model, TOKENS)
    # the q rows of each head, with the q_bias entries added to them: invariant; without them: not
    q_heads = heads(range(WIDTH), "qkv.weight", "q_bias")
    assert not moves(model, TOKENS, q_heads)
    assert moves(model, TOKENS, heads(range(WIDTH), "qkv.weight"))
    num_groups, (weight, bias) = groups["qkv"]
    assert num_groups == HEADS and (weight.name, bias.name) == ("qkv.weight", "q_bias")
    assert rows_of(weight) == list(range(WIDTH)) and rows_of(bias) == list(range(WIDTH))
    # the k rows are invariant too (their bias is a zero buffer), but the graph cannot tell a buffer's value: left
    # out, saying why; the v rows reach the output
    assert not moves(model, TOKENS, heads(range(WIDTH, 2 * WIDTH), "qkv.weight"))
    assert "proj" in rejected and "qkv" not in rejected


class ZeroedBias(nn.Module):
    """torchvision's Swin V2 attention: the layer's own bias cloned with its key part zeroed in place, passed to
    ``F.linear`` with the weight; cosine attention (``F.normalize`` of q and k); ``proj`` by ``F.linear`` too, a
    LayerNorm after it."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        bias = self.qkv.bias.clone()
        bias[WIDTH : 2 * WIDTH].zero_()
        qkv = F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.reshape(b, t, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4).unbind(0)
        attention = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * 10).softmax(-1)
        out = (attention @ v).transpose(1, 2).reshape(b, t, WIDTH)
        return x + self.norm(F.linear(out, self.proj.weight, self.proj.bias))


def test_a_bias_zeroed_in_place_and_cosine_attention_keep_the_q_and_k_heads():
    model = ZeroedBias()
    groups, rejected = found(model, TOKENS)
    qk = heads(range(2 * WIDTH), "qkv.weight", "qkv.bias")
    assert not moves(model, TOKENS, qk)
    num_groups, (weight, bias) = groups["qkv"]
    assert num_groups == 2 * HEADS and rows_of(weight) == rows_of(bias) == list(range(2 * WIDTH))
    assert not moves(model, TOKENS, [[("proj.weight", list(range(WIDTH))), ("proj.bias", list(range(WIDTH)))]])
    assert groups["proj"][0] == 1 and [s.name for s in groups["proj"][1]] == ["proj.weight", "proj.bias"]
    assert rejected == {}


class LiteralBias(ZeroedBias):
    """The same, with a constant tensor as the bias: nothing scales it with the rows."""

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        qkv = F.linear(x, self.qkv.weight, x.new_full((3 * WIDTH,), 0.5))
        q, k, v = qkv.reshape(b, t, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v)
        return self.norm(out.transpose(1, 2).reshape(b, t, WIDTH))


def test_a_constant_bias_on_a_weight_used_outside_its_module_is_named():
    model = LiteralBias()
    groups, rejected = found(model, TOKENS)
    assert moves(model, TOKENS, heads(range(2 * WIDTH), "qkv.weight"))
    assert "qkv" not in groups
    assert rejected["qkv"].startswith("output reaches the model (LiteralBias: Addmm), whose bias no normalization")


class AlsoUsedOutside(nn.Module):
    """A layer called, and its weight used again outside it: both uses normalized."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH, bias=False)
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.lin(x)) + self.norm(F.linear(x.flip(1), self.lin.weight))


def test_a_called_layer_whose_weight_is_used_elsewhere_is_followed_through_both_uses():
    model = AlsoUsedOutside()
    groups, _ = found(model, TOKENS)
    assert not moves(model, TOKENS, [[("lin.weight", list(range(WIDTH)))]])
    assert groups["lin"][0] == 1


# --- kind 5: embedding rows -------------------------------------------------------------------------------------


class Embedded(nn.Module):
    def __init__(self, positions: bool) -> None:
        super().__init__()
        self.words = nn.Embedding(12, WIDTH)
        self.positions = nn.Embedding(5, WIDTH) if positions else None
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.words(idx)
        if self.positions is not None:
            x = x + self.positions(torch.arange(idx.shape[1]))
        return self.head(self.norm(x))


IDS = torch.randint(0, 12, (3, 5), generator=torch.Generator().manual_seed(1))


def test_each_embedding_row_feeding_a_norm_alone_is_a_group():
    model = Embedded(positions=False)
    groups, rejected = found(model, IDS)
    assert not moves(model, IDS, [[("words.weight", [row])] for row in range(12)])
    assert groups["words"][0] == 12 and [s.name for s in groups["words"][1]] == ["words.weight"]
    assert rejected == {"head": "output reaches the model's output before any normalization"}


def test_embeddings_summed_before_the_norm_are_listed_with_the_reason():
    model = Embedded(positions=True)
    groups, rejected = found(model, IDS)
    assert moves(model, IDS, [[("words.weight", [row])] for row in range(12)])
    assert moves(model, IDS, [[("positions.weight", [row])] for row in range(5)])
    assert "words" not in groups and "positions" not in groups
    assert "(Embedded: Add)" in rejected["words"] and "(Embedded: Add)" in rejected["positions"]


# --- kind 4: ReLU linear attention ------------------------------------------------------------------------------


class LinearAttention(nn.Module):
    """timm's EfficientViT ``LiteMLA``, small: a 1×1 qkv conv (head-major ``[q_h, k_h, v_h]`` channels), a
    multi-scale branch (a depthwise conv, then a 1×1 conv grouped per head part), ReLU on q and k, v padded with
    ones, ``out[..., :-1] / (out[..., -1:] + eps)``, a projection conv, a BatchNorm after it or not."""

    def __init__(self, batch_norm: bool) -> None:
        super().__init__()
        self.qkv = nn.Conv2d(WIDTH, 3 * WIDTH, 1, bias=False)
        self.depthwise = nn.Conv2d(3 * WIDTH, 3 * WIDTH, 3, padding=1, groups=3 * WIDTH, bias=False)
        self.pointwise = nn.Conv2d(3 * WIDTH, 3 * WIDTH, 1, groups=3 * HEADS, bias=False)
        self.proj = nn.Conv2d(2 * WIDTH, WIDTH, 1, bias=False)
        self.bn = nn.BatchNorm2d(WIDTH) if batch_norm else nn.Identity()
        self.eps = 1e-5

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        qkv = self.qkv(x)
        both = torch.cat([qkv, self.pointwise(self.depthwise(qkv))], dim=1)
        both = both.reshape(b, -1, 3 * HEAD_DIM, h * w).transpose(-1, -2)
        q, k, v = both.chunk(3, dim=-1)
        q, k, v = F.relu(q), F.relu(k), F.pad(v, (0, 1), mode="constant", value=1.0)
        out = q @ (k.transpose(-1, -2) @ v)
        out = out[..., :-1] / (out[..., -1:] + self.eps)
        out = out.transpose(-1, -2).reshape(b, -1, h, w)
        return self.bn(self.proj(out))


MAPS = torch.randn(2, WIDTH, 3, 3, generator=torch.Generator().manual_seed(2))


def per_head_part(*params: str, period: int = 3 * HEAD_DIM, parts: int = 2) -> list[list[tuple[str, list[int]]]]:
    """One group per q or k head block (``parts`` of each run of ``period`` rows)."""
    return [
        [(p, list(range(h * period + i * HEAD_DIM, h * period + (i + 1) * HEAD_DIM))) for p in params]
        for h in range(HEADS)
        for i in range(parts)
    ]


def test_linear_attention_keeps_the_q_and_k_rows_of_each_head():
    """No norm after the projection: q_h and k_h are invariant (numerator and denominator scale alike), v is not."""
    model = LinearAttention(batch_norm=False)
    groups, rejected = found(model, MAPS)
    for layer in ("qkv", "depthwise", "pointwise"):
        assert not moves(model, MAPS, per_head_part(f"{layer}.weight")), layer
        assert moves(model, MAPS, [[(f"{layer}.weight", list(range(2 * HEAD_DIM, 3 * HEAD_DIM)))]]), layer  # a v
        num_groups, (weight,) = groups[layer]
        expected = [r for h in range(HEADS) for r in range(h * 3 * HEAD_DIM, h * 3 * HEAD_DIM + 2 * HEAD_DIM)]
        assert num_groups == 2 * HEADS and rows_of(weight) == expected, layer
    assert "proj" in rejected


def test_linear_attention_before_a_batch_norm_is_invariant_as_a_whole():
    """A BatchNorm after the projection cancels v's scale too: scaled as a whole, qkv leaves the output as it is
    (its v rows tie all heads through the projection)."""
    model = LinearAttention(batch_norm=True)
    groups, _ = found(model, MAPS)
    assert not moves(model, MAPS, [[("qkv.weight", list(range(3 * WIDTH)))]])
    assert groups["qkv"][0] == 1
    assert moves(model, MAPS, [[("depthwise.weight", list(range(3 * WIDTH)))]])  # half the heads: not as a whole
    assert not moves(model, MAPS, per_head_part("depthwise.weight"))
    assert groups["depthwise"][0] == 2 * HEADS
    assert groups["proj"][0] == WIDTH


class Shifted(LinearAttention):
    """A constant added where no division cancels it: to the numerator, or to k before the product."""

    def __init__(self, where: str) -> None:
        super().__init__(batch_norm=False)
        self.where = where

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b, HEADS, 3 * HEAD_DIM, h * w).transpose(-1, -2).chunk(3, dim=-1)
        v = F.pad(v, (0, 1), mode="constant", value=1.0)
        k = k + 1.0 if self.where == "k" else k
        out = F.relu(q) @ (F.relu(k).transpose(-1, -2) @ v)
        top = out[..., :-1] + 1.0 if self.where == "numerator" else out[..., :-1]
        out = top / (out[..., -1:] + self.eps)
        return self.proj(torch.cat([out, out], -1).transpose(-1, -2).reshape(b, -1, h, w))


def test_a_constant_added_to_the_numerator_breaks_the_scale():
    model = Shifted("numerator")
    groups, rejected = found(model, MAPS)
    assert moves(model, MAPS, per_head_part("qkv.weight", parts=1))  # the q heads
    assert "qkv" not in groups
    assert rejected["qkv"].startswith("output reaches the model (Shifted: Add), then the model (Shifted: Div")


def test_a_constant_added_to_k_leaves_the_q_heads_alone_invariant():
    model = Shifted("k")
    groups, _ = found(model, MAPS)
    assert not moves(model, MAPS, per_head_part("qkv.weight", parts=1))  # q: still cancels
    assert moves(model, MAPS, [[("qkv.weight", list(range(HEAD_DIM, 2 * HEAD_DIM)))]])  # k: no longer
    num_groups, (weight,) = groups["qkv"]
    assert num_groups == HEADS and rows_of(weight) == [r for h in range(HEADS) for r in range(12 * h, 12 * h + 4)]


# --- a right miss, said in the user's terms ---------------------------------------------------------------------


def test_a_norm_of_two_values_is_named_as_what_keeps_the_layer_unverified():
    """A BatchNorm over a 1×1 map of a batch of 2 normalizes two values per channel: its output is ±1, the layer
    before it is invariant (the ground truth), but its gradient is round-off and eps, which verifies nothing; the
    reason said "invariant only up to the eps", and now says what happens."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
        nn.Linear(8, 2),
    )  # fmt: skip
    images = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(3))
    _, rejected = found(model, images)
    assert not moves(model, images, [[("2.weight", [c]), ("2.bias", [c])] for c in range(8)])
    assert rejected["2"].startswith("3 (BatchNorm2d) normalizes only 2 values together on this batch")
    assert "up to the eps" not in rejected["2"]


# --- what the graph cannot tell: in-place writes into a bias, a constant of unknown size -----------------------


class WrittenBias(ZeroedBias):
    """Swin V2's attention with another in-place write into the key part of the bias than ``zero_()``."""

    def __init__(self, write: str) -> None:
        super().__init__()
        self.write = write
        with torch.no_grad():
            self.qkv.bias.normal_()

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        bias = self.qkv.bias.clone()
        getattr(bias[WIDTH : 2 * WIDTH], self.write)(*([] if self.write == "zero_" else [1e-3]))
        q, k, v = F.linear(x, self.qkv.weight, bias).reshape(b, t, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4).unbind(0)
        attention = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * 10).softmax(-1)
        return (attention @ v).transpose(1, 2).reshape(b, t, WIDTH)


@pytest.mark.parametrize(("write", "kept"), [("zero_", 2 * WIDTH), ("fill_", WIDTH), ("add_", WIDTH)])
def test_an_in_place_write_into_the_bias_counts_as_a_zero_only_when_it_held_zero(write, kept):
    """``zero_()``, ``fill_(c)`` and ``add_(c)`` on a slice of the bias leave the same graph (``fill_`` looks like a
    zero, ``add_`` like a copy): the values the bias held in the forward pass decide; with ``fill_`` and ``add_`` the
    key rows are not invariant, and are left out."""
    model = WrittenBias(write)
    groups, _ = found(model, TOKENS)
    num_groups, (weight, bias) = groups["qkv"]
    assert rows_of(weight) == rows_of(bias) == list(range(kept)) and num_groups == kept // HEAD_DIM
    assert not moves(model, TOKENS, heads(range(kept), "qkv.weight", "qkv.bias"))
    if kept < 2 * WIDTH:
        assert moves(model, TOKENS, heads(range(WIDTH, 2 * WIDTH), "qkv.weight", "qkv.bias"))


class DividedPlusConstant(nn.Module):
    def __init__(self, constant: float) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.constant = constant

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.fc(x))
        return y / (y.sum(-1, keepdim=True) + self.constant)


def test_a_constant_of_unknown_size_added_to_a_divisor_is_tested_as_strictly_as_a_numeric_candidate():
    """``y / (Σy + c)`` is a normalization up to c, whose size the graph does not hold: only the gradient vouches
    for it, with the numeric test's δ = 0.01; with c = 1 it is rejected, and the reason names the constant."""
    from lightning_sphere.core.tolerance import NUMERIC_TOLERANCE, random_cosine, tolerance_for

    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    groups, rejected = found(DividedPlusConstant(1e-6), x)
    assert "fc" in groups
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (entry,) = find_invariant_groups(DividedPlusConstant(1e-6), x)
    assert entry.unknown_eps and tolerance_for(entry) == NUMERIC_TOLERANCE * random_cosine(entry.group_size)
    model = DividedPlusConstant(1.0)
    groups, rejected = found(model, x)
    assert moves(model, x, [[("fc.weight", list(range(16))), ("fc.bias", list(range(16)))]])
    assert "fc" not in groups
    assert rejected["fc"].startswith("invariant only up to the constant added at the model (DividedPlusConstant: Add)")


# --- the monitor attached: training unchanged -----------------------------------------------------------------


class TokenModel(pl.LightningModule):
    """Embedding rows into a LayerNorm, then EVA's attention (``F.linear`` on ``qkv.weight`` with a bias built on
    the spot): what the first step's recording reads (the weights' own uses, the bias values) runs on it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.words = nn.Embedding(12, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)
        self.attention = BuiltBias()
        self.head = nn.Linear(WIDTH, 3)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        ids, y = batch
        out = self.head(self.attention(self.norm(self.words(ids))).mean(1))
        loss = F.cross_entropy(out, y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(3)
        data = TensorDataset(torch.randint(0, 12, (24, 5), generator=gen), torch.randint(0, 3, (24,), generator=gen))
        return DataLoader(data, batch_size=8)


def test_the_monitor_leaves_training_with_weights_followed_from_their_uses_bitwise_unchanged(tmp_path):
    runs = {}
    for monitored in (False, True):
        model, monitor = TokenModel(), SphereMonitor()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = fit(model, tmp_path, [monitor] if monitored else [], max_steps=3)
        losses = [m["loss"] for _, m in trainer.logger.history if "loss" in m]
        state = {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}
        runs[monitored] = (losses, state, monitor)
    assert runs[False][0] == runs[True][0] and len(runs[True][0]) == 3
    assert runs[False][1].keys() == runs[True][1].keys()
    for name, value in runs[False][1].items():
        assert torch.equal(value, runs[True][1][name]), name
    # and the monitor did read them: the embedding rows, the q rows of each head with q_bias
    tracked = {g.module_name: [s.name for s in g.slices] for g in runs[True][2].groups}
    assert tracked["words"] == ["words.weight"]
    assert tracked["attention.qkv"] == ["attention.qkv.weight", "attention.q_bias"]
