"""Candidate groups from the autograd graph, and their verification by gradient orthogonality."""

import pytest
import torch
from torch import nn

from lightning_sphere import find_invariant_groups
from lightning_sphere.core.tolerance import cosine_tolerance
from lightning_sphere.detection.finder import GroupFinder


class Residual(nn.Module):
    """conv → BN, with the conv output also added to the block output: not invariant."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class Branchy(nn.Module):
    """Data-dependent control flow: which branch runs depends on the batch."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5))
        self.b = nn.Sequential(nn.Conv2d(3, 5, 3), nn.GELU(), nn.BatchNorm2d(5))

    def forward(self, x):
        return self.a(x) if x.mean() > -100 else self.b(x)


class Penalized(nn.Module):
    """conv → BN, but the output also carries a weight penalty: the loss is not invariant."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)).mean((2, 3)) + self.conv.weight.square().sum()


def found(model, x):
    finder = GroupFinder(model)
    finder.start()
    out = model(x)
    finder.stop()
    finder.analyze([out])
    pending = {g.module_name: g for g in finder.pending}
    return pending, {name: why for name, why in finder.untracked().items() if name not in pending}


IMG = torch.randn(8, 3, 6, 6)


def test_bn_after_conv_is_one_group_per_channel_without_the_bias():
    groups, rejected = found(nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(80, 2)), IMG)
    assert list(groups) == ["0"] and "reaches the model's output" in rejected["3"]
    g = groups["0"]
    assert (g.num_groups, g.group_size, g.norm_name, g.norm_type) == (5, 27, "1", "BatchNorm2d")
    assert [s.name for s in g.slices] == ["0.weight"]


class MaxOverRows(nn.Module):
    """``x.max(dim)``: max(ρx) = ρ max(x) for ρ > 0, and a per-channel shift passes through."""

    def forward(self, x):
        return x.max(dim=2, keepdim=True).values


@pytest.mark.parametrize(
    ("between", "bias_joins"),
    [
        (nn.ReLU(), True),
        (nn.LeakyReLU(0.1), True),
        (nn.Dropout(0.3), True),
        (nn.MaxPool2d(2), False),
        (nn.AvgPool2d(2), False),
        (nn.Identity(), False),
        (MaxOverRows(), False),
    ],
)
def test_homogeneous_ops_between_keep_the_group(between, bias_joins):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), between, nn.BatchNorm2d(4))
    groups, _ = found(model, IMG)
    names = [s.name for s in groups["0"].slices]
    assert names == (["0.weight", "0.bias"] if bias_joins else ["0.weight"])
    assert groups["0"].group_size == 27 + bias_joins


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.BatchNorm2d(4)), "Gelu"),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.BatchNorm2d(4)), "Silu"),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.BatchNorm2d(4)), "Tanh"),
        (Residual(), "used besides"),
        (Penalized(), "also used outside"),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).eval()), "running statistics"),
    ],
)
def test_broken_invariance_is_rejected_with_a_reason(model, reason):
    groups, rejected = found(model, torch.randn(8, 3 if not isinstance(model, Residual) else 4, 6, 6))
    name = "conv" if isinstance(model, Residual | Penalized) else "0"
    assert name not in groups
    assert reason in rejected[name]


class SequenceBN(nn.Module):
    """Linear on (N, T, C) tokens, permuted to (N, C, T) for BatchNorm1d: one group per output feature."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 5, bias=False)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.proj(x).permute(0, 2, 1))


def test_views_between_keep_the_channel_groups():
    flat = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.BatchNorm1d(64))
    assert found(flat, IMG)[0]["0"].num_groups == 4
    groups = find_invariant_groups(flat, IMG)  # BatchNorm1d per (channel, position) feature: still invariant
    assert [g.module_name for g in groups] == ["0"]
    sequence = find_invariant_groups(SequenceBN(), torch.randn(8, 7, 6))
    assert [(g.module_name, g.num_groups, g.group_size) for g in sequence] == [("proj", 5, 6)]


def test_frozen_weights_are_not_candidates():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model[0].weight.requires_grad_(False)
    groups, rejected = found(model, IMG)
    assert groups == {} and rejected["0"] == "weight is frozen"


def test_instance_norm_without_running_stats_works_in_eval_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4)).eval()
    groups, _ = found(model, IMG)
    assert groups["0"].num_groups == 4


def test_linear_and_conv_transpose_channels():
    model = nn.Sequential(nn.Flatten(), nn.Linear(108, 6), nn.ReLU(), nn.BatchNorm1d(6))
    assert [s.name for s in found(model, IMG)[0]["1"].slices] == ["1.weight", "1.bias"]
    up = nn.Sequential(nn.ConvTranspose2d(3, 8, 2, stride=2, groups=1), nn.BatchNorm2d(8))
    g = found(up, IMG)[0]["0"]
    assert (g.num_groups, g.group_size, g.slices[0].channel_dims) == (8, 12, (1,))
    grouped = nn.Sequential(nn.ConvTranspose2d(4, 6, 2, groups=2), nn.BatchNorm2d(6))
    g = found(grouped, torch.randn(8, 4, 5, 5))[0]["0"]
    assert (g.num_groups, g.group_size, g.slices[0].split, g.slices[0].channel_dims) == (6, 8, 2, (0, 2))


def test_data_dependent_control_flow_uses_the_branch_that_ran():
    groups, rejected = found(Branchy(), IMG)
    assert list(groups) == ["a.0"] and rejected["b.0"] == "not called yet"  # b never ran


def grad_cos_per_channel(layer_weight, grad):
    x, g = layer_weight.detach().flatten(1), grad.flatten(1)
    return ((x * g).sum(1) / (x.norm(dim=1) * g.norm(dim=1))).abs()


def test_find_invariant_groups_verifies_and_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.ReLU(), nn.BatchNorm2d(6), nn.Dropout(0.2), nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4)
    ).eval()
    model[4].weight.grad = torch.ones_like(model[4].weight)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    groups = find_invariant_groups(model, IMG)
    assert [g.module_name for g in groups] == ["0", "4"] and groups.rejected == {}
    assert all(0 <= g.cosine <= 1e-3 for g in groups)
    assert not model.training and not any(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(model[4].weight.grad, torch.ones_like(model[4].weight)) and model[0].weight.grad is None


def test_a_candidate_that_fails_verification_is_dropped_with_its_cosine():
    """BatchNorm with an eps far above the pre-norm variance is almost linear: structure passes, numbers do not."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e3), nn.Flatten(), nn.Linear(64, 3))
    with pytest.warns(
        UserWarning, match=r"0: invariant only up to the eps of 1 \(BatchNorm2d\), eps=1000, .* max \|cos\(g, x\)\| = "
    ):
        assert find_invariant_groups(model, IMG) == []


def test_verification_waits_for_a_usable_gradient():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    finder = GroupFinder(model)
    finder.start()
    out = model(IMG)
    finder.stop()
    finder.analyze([out])
    weight = model[0].weight
    assert finder.verify({}) == [] and len(finder.pending) == 1  # no gradient yet
    assert finder.verify({weight: torch.full_like(weight, float("nan"))}) == [] and len(finder.pending) == 1
    (out * torch.randn_like(out)).sum().backward()
    assert finder.verify({weight: weight.grad}) == [] and finder.done
    assert finder.accepted[0].cosine == pytest.approx(grad_cos_per_channel(weight, weight.grad).max().item(), rel=1e-4)


def test_tolerance_widens_for_16_bit_gradients():
    assert cosine_tolerance(torch.float32) == cosine_tolerance(torch.float64) == 1e-3
    assert cosine_tolerance(torch.float16) == pytest.approx(3.9e-3, rel=0.01)
    assert cosine_tolerance(torch.bfloat16) == pytest.approx(3.1e-2, rel=0.01)


@pytest.mark.parametrize(
    ("model", "aligned"),
    [
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), True),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.1), nn.BatchNorm2d(4)), True),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.BatchNorm1d(64)), False),  # 16 features per group
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)), False),  # two channels per group
    ],
)
def test_channels_aligned_says_whether_norm_channel_c_is_output_channel_c(model, aligned):
    """What lets the AdamG rewrite keep a BatchNorm's running statistics in step: one per group, in order."""
    assert found(model, IMG)[0]["0"].channels_aligned == aligned
    sequence, _ = found(SequenceBN(), torch.randn(8, 7, 6))
    assert not sequence["proj"].channels_aligned  # a permute on the way: not trusted


def test_numeric_mode_rejects_a_large_layer_no_normalization_follows():
    """Issue input: a 1024×1024 Linear in an MLP without any normalization passed the fixed 1e-3 test as one
    whole-layer group (|cos| 8.4e-4, while a random direction shows 1/√d = 1e-3). Scaling it changes the
    output (checked here), and the test relative to 1/√d refuses it."""
    torch.manual_seed(3)  # a draw whose whole-layer |cos| (8.6e-4) the old fixed 1e-3 accepted
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    x = torch.randn(32, 1024)
    with torch.no_grad():
        before = model(x)
        model[0].weight.mul_(2)
        assert not torch.allclose(model(x), before, rtol=1e-3)  # not invariant
        model[0].weight.div_(2)
    with pytest.warns(UserWarning):
        groups = find_invariant_groups(model, x, groups="numeric")
    assert [g.module_name for g in groups] == []
    reason = groups.rejected["0"]
    assert "a random direction shows about 1/√d = 9.8e-04 (d = 1,048,576)" in reason
    assert float(reason.split("max |cos(g, x)| = ")[1].split(" ")[0]) < 1e-3  # under the old fixed threshold


class ZeroInitBlock(nn.Module):
    """A residual block whose last BatchNorm weight starts at zero (torchvision's ``zero_init_residual``):
    the outputs give its convs no gradient on the first batch, yet each is per-channel invariant."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.conv2, self.bn2 = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x):
        return x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def test_a_zero_initialized_branch_is_verified_with_a_probe():
    """Issue input: timm's ResNet-50d lost 48 of its 55 invariant convs to "no gradient on the example
    input". A random cotangent on each norm's normalized output (before its zero weight) verifies them."""
    torch.manual_seed(0)
    model = ZeroInitBlock()
    x = torch.randn(4, 3, 6, 6)
    params = [p.detach().clone() for p in model.parameters()]
    groups = find_invariant_groups(model, x)
    assert sorted(g.module_name for g in groups) == ["conv1", "conv2"]
    assert all(g.cosine < 1e-4 for g in groups)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))  # left as it was
    assert model.bn2.weight.grad is None


def test_the_probe_does_not_vouch_for_a_layer_that_is_not_invariant():
    """The probe reads the gradient of the normalized output: a conv whose output also skips its norm is
    rejected by the graph before any probe, and a GELU before the norm still fails the test."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.BatchNorm2d(4))
    nn.init.zeros_(model[2].weight)
    groups = find_invariant_groups(model, IMG)
    assert groups == [] and "Gelu" in groups.rejected["0"]


def conv_block(channels=3):
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())


class ReentrantBlocks(nn.Module):
    """A stem, three blocks under torch.utils.checkpoint(use_reentrant=True) (found during the backward pass, in
    reverse), a block whose conv reaches a GELU, and a head."""

    def __init__(self):
        super().__init__()
        self.stem = conv_block()
        self.blocks = nn.ModuleList([conv_block() for _ in range(3)])
        self.gelu = nn.Sequential(nn.Conv2d(3, 3, 1), nn.GELU(), nn.BatchNorm2d(3))
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=True)
        return self.head(self.gelu(x).mean((2, 3)))


def in_model_order(model, names):
    """``names`` sorted as ``model.named_modules()`` lists the modules: the reference order."""
    order = [name for name, _ in model.named_modules()]
    return sorted(names, key=order.index)


def test_groups_and_reasons_come_in_model_order():
    """Before: stem.0, blocks.2.0, blocks.1.0, blocks.0.0 (the order the recomputed forwards ran in)."""
    model = ReentrantBlocks()
    found = find_invariant_groups(model, torch.randn(4, 3, 5, 5))
    names = [g.module_name for g in found]
    assert set(names) == {"stem.0", "blocks.0.0", "blocks.1.0", "blocks.2.0"}
    assert names == in_model_order(model, names)
    assert list(found.rejected) == ["gelu.0", "head"] == in_model_order(model, found.rejected)


def test_the_monitor_lists_groups_and_its_summary_in_model_order(tmp_path):
    import pytorch_lightning as pl
    import torch.nn.functional as F

    from lightning_sphere import SphereMonitor
    from tests.lightning_helpers import fit

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = ReentrantBlocks()

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.model(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            data = torch.utils.data.TensorDataset(torch.randn(16, 3, 5, 5), torch.randint(0, 2, (16,)))
            return torch.utils.data.DataLoader(data, batch_size=8)

    module, monitor = Module(), SphereMonitor()
    fit(module, tmp_path, [monitor], max_steps=2)
    names = [g.module_name for g in monitor.groups]
    assert names == in_model_order(module, names) and len(names) == 4
    rows = [line.split()[0] for line in monitor.summary().splitlines()[2:6]]
    assert rows == names
