"""Groups without the graph: weight normalization, the numeric test, and a user's mapping."""

import copy
import warnings

import pytest
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_sphere import SphereMonitor, find_invariant_groups
from tests.lightning_helpers import MemoryLogger, Net, fit

IMG = torch.randn(8, 3, 4, 4)


def mixed():
    """conv → BN (per channel), Linear → LayerNorm (only the whole layer), and a classifier (neither)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(64, 16, bias=False), nn.LayerNorm(16), nn.Linear(16, 3),
    )  # fmt: skip


def summary_of(groups):
    return {g.module_name: (g.granularity, g.num_groups, g.group_size) for g in groups}


def test_numeric_test_keeps_channels_else_layers_else_nothing():
    groups = find_invariant_groups(mixed(), IMG, groups="numeric")
    assert summary_of(groups) == {"0": ("channel", 4, 27), "4": ("layer", 1, 1024)}
    assert "gradient not orthogonal" in groups.rejected["6"]
    assert all(g.norm_type == "gradient test" for g in groups)


def test_mapping_names_modules_or_parameters_with_any_granularity():
    model = mixed()
    groups = find_invariant_groups(model, IMG, groups={"0": 2, "4.weight": "layer"})
    assert summary_of(groups) == {"0": ("2 channels", 2, 54), "4.weight": ("layer", 1, 1024)}
    assert [s.name for s in groups[0].slices] == ["0.weight"]


def test_mapping_of_a_module_takes_weight_and_bias_and_a_wrong_guess_is_rejected():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2))
    with pytest.warns(UserWarning, match="4: gradient not orthogonal"):
        groups = find_invariant_groups(model, IMG, groups={"0": "channel", "4": "channel"})
    assert [s.name for s in groups[0].slices] == ["0.weight", "0.bias"] and len(groups) == 1


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        (
            {"conv": "channel"},
            r"'conv' is neither a module nor a parameter.*valid names: 0, 1, 2, 3, 4, 5, 6, 0.weight",
        ),
        ({"4.wieght": "layer"}, r"did you mean '4.weight'"),
        ({"0": 3}, r"'0' has 4 output channels: groups of 3 do not tile them; use one of \[1, 2, 4\]"),
        ({"0": "row"}, r"granularity must be one of \('channel', 'layer'\) or a number"),
        ({"6.bias": "channel"}, r"groups of 1 entry cannot be invariant"),
        ({"2": "layer"}, r"module '2' has no trainable parameters of its own"),
    ],
)
def test_mapping_errors_say_what_to_change(mapping, message):
    with pytest.raises(ValueError, match=message):
        find_invariant_groups(mixed(), IMG, groups=mapping)


def test_old_style_weight_norm():
    with pytest.warns(FutureWarning):
        layer = torch.nn.utils.weight_norm(nn.Linear(48, 6), dim=0)
    model = nn.Sequential(nn.Flatten(), layer, nn.Tanh(), nn.Linear(6, 2))
    groups = find_invariant_groups(model, IMG)
    assert summary_of(groups) == {"1": ("channel", 6, 48)} and groups[0].slices[0].name == "1.weight_v"


def test_whole_tensor_weight_norm():
    model = nn.Sequential(nn.Flatten(), torch.nn.utils.parametrizations.weight_norm(nn.Linear(48, 6), dim=None))
    assert summary_of(find_invariant_groups(model, IMG)) == {"1": ("layer", 1, 288)}


def test_a_weight_normalized_buffer_is_left_alone_not_an_error():
    """A weight kept as a buffer, weight-normalized: its direction is a buffer too, which no optimizer steps (left
    alone, as a plain buffer weight is)."""
    layer = nn.Linear(48, 6)
    weight = layer.weight.detach()
    del layer.weight
    layer.register_buffer("weight", weight)
    model = nn.Sequential(nn.Flatten(), torch.nn.utils.parametrizations.weight_norm(layer), nn.Tanh(), nn.Linear(6, 2))
    groups = find_invariant_groups(model, IMG)
    assert list(groups) == [] and groups.rejected == {"3": "output reaches the model's output before any normalization"}


def test_monitor_groups_argument(tmp_path):
    logger = MemoryLogger()
    monitor = SphereMonitor(groups={"net.0": "channel", "net.3": "layer"})
    fit(Net(), tmp_path, [monitor], max_steps=2, logger=logger)
    assert summary_of(monitor.groups) == {"net.0": ("channel", 6, 9), "net.3": ("layer", 1, 440)}
    assert "sphere/angular_update/net.3" in logger.sphere()[1]
    numeric = SphereMonitor(groups="numeric")
    fit(Net(), tmp_path, [numeric], max_steps=2)
    assert summary_of(numeric.groups) == {"net.0": ("channel", 6, 9)}  # net.3 needs its bias: numeric misses it
    assert "explicit" in monitor.summary() and "gradient test" in numeric.summary()


def test_monitor_refuses_a_bad_mapping_at_setup(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"SphereMonitor\(groups=...\): 'net.9'.*did you mean"):
        fit(Net(), tmp_path, [SphereMonitor(groups={"net.9": "channel"})])
    with pytest.raises(MisconfigurationException, match=r"SphereMonitor\(`groups`\) must be"):
        SphereMonitor(groups="everything")


class Tied(nn.Module):
    """An embedding tied to the LM head (nanoGPT, Llama's ``tie_word_embeddings``), a projection normalized as a
    whole between them."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.proj = nn.Linear(8, 8, bias=False)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(self.norm(self.proj(self.emb(idx))))


@pytest.mark.parametrize("mode", ["auto", "numeric"])
def test_both_owners_of_a_tied_weight_are_tracked_or_listed(mode):
    """Before: in numeric mode, head (the second owner: named_parameters() drops duplicates) was in neither list."""
    model = Tied()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the numeric test rejects emb
        groups = find_invariant_groups(model, torch.randint(0, 11, (4, 5)), groups=mode)
    assert [g.module_name for g in groups] == ["proj"]
    if mode == "numeric":
        assert groups.rejected["head"] == "weight shared with emb (`head.weight` is `emb.weight`), tested there"
        assert groups.rejected["emb"].startswith("gradient not orthogonal to the weights")
        twin, idx = copy.deepcopy(model).double(), torch.randint(0, 11, (4, 5))
        with torch.no_grad():  # ground truth: scaling the shared tensor moves the output (through head)
            reference = twin(idx)
            twin.emb.weight.mul_(2)
            assert (twin(idx) - reference).abs().max() > 1e-3 * reference.abs().max()
    else:  # emb is followed from its weight, through both uses: head's reaches the output
        assert groups.rejected == {
            "emb": "weight used 2 times (emb (Embedding), head (Linear: T)): output reaches the model's output "
            "before any normalization",
            "head": "output reaches the model's output before any normalization",
        }
