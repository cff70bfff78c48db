"""The functional ground truth (tests/ground_truth.py) on models whose invariant groups are known by hand."""

import torch
import torch.nn.functional as F
from torch import nn

from lightning_sphere.core.groups import InvariantGroups, ParamSlice
from tests import ground_truth as gt


class FusedQKNorm(nn.Module):
    """timm-style attention: one Linear makes q, k and v (2 heads of 4 each), q and k normalized per head."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.q_norm, self.k_norm = nn.LayerNorm(4), nn.LayerNorm(4)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(out.transpose(1, 2).reshape(b, n, 8))


def test_verdicts_match_the_hand_counted_groups():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3),  # → BN: per channel, bias cancelled
        nn.BatchNorm2d(6),
        nn.Conv2d(6, 8, 3),  # → ReLU → GroupNorm(2): per 4 channels, bias joins
        nn.ReLU(),
        nn.GroupNorm(2, 8),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),  # → LayerNorm: whole layer
        nn.LayerNorm(10),
        nn.Linear(10, 5),  # the output: not invariant
    )
    truth = gt.ground_truth(model, torch.randn(4, 3, 8, 8))
    blocks = {name: v.block for name, v in truth.verdicts.items()}
    assert blocks == {"0": 1, "2": 4, "6": 10, "8": None}
    assert all(v.real_eps for name, v in truth.verdicts.items() if name != "8")
    invariant_max, failed_min = truth.gap
    assert invariant_max < 1e-12 and failed_min > 1e-2


def test_fused_qkv_q_and_k_heads_alone():
    torch.manual_seed(0)
    truth = gt.ground_truth(FusedQKNorm(), torch.randn(2, 5, 8), head_dim=4)
    assert truth.verdicts["qkv"].block is None
    assert truth.verdicts["qkv"].heads == (0, 1, 2, 3)  # q's two heads, k's two; v's are not invariant
    assert not truth.verdicts["proj"].structural


def test_eps_that_dominates_the_variance_is_not_invariant_at_real_eps():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1e-2)  # pre-norm variance ~1e-4 against eps = 1e-2
    model = nn.Sequential(conv, nn.BatchNorm2d(2, eps=1e-2))
    verdict = gt.ground_truth(model, torch.randn(4, 1, 3, 3)).verdicts["0"]
    assert verdict.block == 1 and not verdict.real_eps and verdict.real_change > gt.REAL_EPS_TOLERANCE


def test_a_claim_without_the_bias_the_relu_keeps_is_a_false_positive():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
    with torch.no_grad():
        model[0].bias.uniform_(0.5, 1.0)
    x = torch.randn(4, 2, 6, 6)

    def claim(with_bias):
        pieces = [ParamSlice("0.weight", model[0].weight)] + with_bias * [ParamSlice("0.bias", model[0].bias)]
        return InvariantGroups("0", tuple(pieces), 4, "2", "BatchNorm2d")

    changes = gt.claim_change(model, x, [claim(True)])
    assert changes["0"] < 1e-12
    changes = gt.claim_change(model, x, [claim(False)])
    assert changes["0"] > 1e-3


def test_randomizes_only_all_zero_parameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    nn.init.zeros_(model[1].weight)
    nn.init.zeros_(model[0].bias)
    before = model[0].weight.detach().clone()
    assert gt.randomize_zero_parameters(model) == ["0.bias", "1.weight", "1.bias"]
    assert torch.equal(model[0].weight, before)
    assert all(p.abs().min() > 0 for p in model.parameters())


class StandardizedConv(nn.Conv2d):
    """Weight standardization (timm's StdConv2d): each filter centred and scaled to unit variance."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = 1e-6

    def forward(self, x):
        w = self.weight
        mean, var = w.mean((1, 2, 3), keepdim=True), w.var((1, 2, 3), unbiased=False, keepdim=True)
        return self._conv_forward(x, (w - mean) / (var + self.eps).sqrt(), self.bias)


def test_weight_standardization_makes_the_weight_alone_invariant():
    torch.manual_seed(0)
    model = nn.Sequential(StandardizedConv(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    with torch.no_grad():
        model[0].bias.uniform_(0.5, 1.0)
    verdict = gt.ground_truth(model, torch.randn(2, 2, 6, 6)).verdicts["0"]
    assert verdict.block == 1 and not verdict.with_bias and verdict.real_eps
