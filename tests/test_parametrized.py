"""Layers whose weight is computed from the tensor the optimizer steps (issue 18, item 2): parametrizations,
pruning and the older spectral norm, tracked on that tensor or listed with a true reason, and never computed by
detection itself.

Every claim is checked against a functional ground truth written here: in a float64 copy of the model, in
training mode, scaling the stored tensor (its output channels by random positive factors, or the whole of it by
ρ = 2 and 0.5) leaves the output unchanged for what is tracked, and changes it for what is not.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

from lightning_sphere import SphereMonitor, find_invariant_groups, summarize
from tests.lightning_helpers import Net, fit

#: Normalizations with an eps that float64 does not see: the ground truth then shows round-off only.
EPS = 1e-30
#: Above this relative output change, a scaling changed the model; below it, only round-off.
UNCHANGED, CHANGED = 1e-10, 1e-3


class Mask(nn.Module):
    """A user parametrization: a fixed 0/1 mask on the weight."""

    def __init__(self, shape):
        super().__init__()
        self.register_buffer("mask", (torch.rand(shape) > 0.3).double())

    def forward(self, weight):
        return weight * self.mask.to(weight.dtype)


class Halves(nn.Module):
    """A user parametrization stored as two tensors (``right_inverse`` returns both)."""

    def forward(self, a, b):
        return a + b

    def right_inverse(self, weight):
        return weight / 2, weight / 2


def computed(kind, layer):
    """``layer`` with its weight computed by ``kind``; returns the layer."""
    if kind == "spectral_norm":
        parametrizations.spectral_norm(layer)
    elif kind == "orthogonal":
        parametrizations.orthogonal(layer)
        with torch.no_grad():  # torch starts it at -I, where the map ignores the diagonal: move off that point
            layer.parametrizations.weight.original.normal_()
    elif kind == "mask":
        parametrize.register_parametrization(layer, "weight", Mask(layer.weight.shape))
    elif kind == "halves":
        parametrize.register_parametrization(layer, "weight", Halves())
    elif kind == "l1_unstructured":
        prune.l1_unstructured(layer, "weight", amount=0.3)
    elif kind == "random_unstructured":
        prune.random_unstructured(layer, "weight", amount=0.3)
    elif kind == "legacy_spectral_norm":
        torch.nn.utils.spectral_norm(layer)
    return layer


#: What the optimizer steps, by kind, as torch names it (read off the model: :func:`stepped`).
STORED = {
    "spectral_norm": "0.parametrizations.weight.original",
    "mask": "0.parametrizations.weight.original",
    "l1_unstructured": "0.weight_orig",
    "random_unstructured": "0.weight_orig",
    "legacy_spectral_norm": "0.weight_orig",
}
ROW_SCALING = list(STORED)


def stepped(net, kind):
    """The tensor the optimizer steps for ``net[0]``'s weight, looked up by torch's own name."""
    return dict(net.named_parameters())[STORED.get(kind, "0.parametrizations.weight.original")]


def build(kind, layer, after="norm"):
    """``layer`` (one of :data:`LAYOUT`) with its weight computed by ``kind``, then a BatchNorm (or, with
    ``after="tanh"``, a tanh: no normalization), then a classifier; and an input for it."""
    if layer == "linear":
        first, norm, x = nn.Linear(12, 5), nn.BatchNorm1d(5, eps=EPS), torch.randn(16, 12)
        width = 5
    elif layer == "conv":
        first, norm, x = nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5, eps=EPS), torch.randn(8, 3, 5, 5)
        width = 5 * 9
    elif layer == "conv_transpose":
        first, norm, x = nn.ConvTranspose2d(3, 5, 3), nn.BatchNorm2d(5, eps=EPS), torch.randn(8, 3, 5, 5)
        width = 5 * 49
    else:
        first, norm, x = nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6, eps=EPS), torch.randn(8, 4, 5, 5)
        width = 6 * 49
    after_layer = norm if after == "norm" else nn.Tanh()
    net = nn.Sequential(computed(kind, first), after_layer, nn.ReLU(), nn.Flatten(), nn.Linear(width, 2))
    return net, x


#: By layer: the dimensions of the weight that index output channels, and how many there are. A grouped
#: ConvTranspose's weight is (C_in, C_out / groups, *k): output channel (group of dim 0, dim 1).
LAYOUT = {"conv": ((0,), 5), "linear": ((0,), 5), "conv_transpose": ((1,), 5), "conv_transpose_grouped": ((0, 2), 6)}


def twin(net):
    """A deep copy of ``net``. A pre-hook's computed weight (pruning, the older spectral norm) is a plain attribute
    that holds a graph and cannot be copied: the copy goes without it, and its pre-hook sets it again."""
    computed = {(m, k): v for m in net.modules() for k, v in vars(m).items() if isinstance(v, torch.Tensor)}
    for module, key in computed:
        delattr(module, key)
    try:
        return copy.deepcopy(net)
    finally:
        for (module, key), value in computed.items():
            setattr(module, key, value)


def change(net, x, kind, scale):
    """Relative change of the float64 training-mode output when ``scale`` rewrites the stored tensor; each
    forward runs on a fresh copy, so that spectral norm's power iteration starts from the same ``_u``, ``_v``."""

    def output(f):
        copied = twin(net).double().train()
        with torch.no_grad():
            if f is not None:
                tensor = stepped(copied, kind)
                tensor.copy_(f(tensor))
            return copied(x.double())

    reference = output(None)
    return float((output(scale) - reference).abs().max() / reference.abs().max())


def per_channel(layer):
    """Multiply the weight of output channel c of ``layer`` by a random factor in [1/2, 2]."""
    dims, channels = LAYOUT[layer]
    factors = torch.exp((torch.rand(channels, dtype=torch.float64) * 2 - 1) * math.log(2))

    def scale(t):
        if layer == "conv_transpose_grouped":
            return (t.unflatten(0, (2, -1)) * factors.view(2, 1, -1, 1, 1)).flatten(0, 1)
        shape = [1] * t.dim()
        shape[dims[0]] = channels
        return t * factors.view(shape)

    return scale


def described(groups):
    return [(g.module_name, [s.name for s in g.slices], g.granularity, g.num_groups, g.norm_name) for g in groups]


@pytest.mark.parametrize("layer", list(LAYOUT))
@pytest.mark.parametrize("kind", ROW_SCALING)
def test_a_computed_weight_before_a_norm_is_tracked_per_channel_on_the_stepped_tensor(kind, layer):
    """Before: "found no radially invariant group", the layer in neither list."""
    net, x = build(kind, layer)
    groups = find_invariant_groups(net, x)
    dims, channels = LAYOUT[layer]
    assert described(groups) == [("0", [STORED[kind]], "channel", channels, "1")]
    assert groups[0].slices[0].param is stepped(net, kind)
    assert groups[0].slices[0].channel_dims == dims
    assert change(net, x, kind, per_channel(layer)) < UNCHANGED  # ground truth: each channel is invariant
    assert "4: output reaches the model's output before any normalization" in summarize(groups, net, groups.rejected)


@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_an_orthogonal_weight_is_listed_with_where_its_channels_mix(layer):
    kind = "orthogonal"
    net, x = build(kind, layer)
    groups = find_invariant_groups(net, x)
    assert list(groups) == []
    assert groups.rejected["0"] == (
        "weight computed by parametrization `_Orthogonal`, whose output does not scale with the rows of "
        "`0.parametrizations.weight.original` (they mix in Tril)"
    )
    assert change(net, x, kind, per_channel(layer)) > CHANGED  # ground truth: not invariant per channel
    assert change(net, x, kind, lambda t: 2 * t) > CHANGED  # nor as a whole


@pytest.mark.parametrize("layer", ["conv", "linear"])
@pytest.mark.parametrize(
    ("kind", "norm_name", "norm_type"),
    [
        ("spectral_norm", "0.parametrizations.weight", "_SpectralNorm"),
        ("legacy_spectral_norm", "", "SpectralNorm"),
    ],
)
def test_spectral_norm_makes_the_stored_tensor_one_invariant_group_whatever_follows(kind, norm_name, norm_type, layer):
    """σ(ρV) = ρσ(V): W = V/σ(V) does not see V's scale, with no normalization after the layer."""
    net, x = build(kind, layer, after="tanh")
    groups = find_invariant_groups(net, x)
    assert described(groups) == [("0", [STORED[kind]], "layer", 1, norm_name)]
    assert groups[0].norm_type == norm_type and groups[0].slices[0].channel_dims == ()
    # ground truth: invariant as a whole
    assert max(change(net, x, kind, lambda t, rho=rho: rho * t) for rho in (2.0, 0.5)) < UNCHANGED
    assert change(net, x, kind, per_channel(layer)) > CHANGED  # but not channel by channel: one group, not five


def test_a_mask_with_no_norm_after_is_listed_with_the_true_reason():
    kind = "mask"
    net, x = build(kind, "conv", after="tanh")
    groups = find_invariant_groups(net, x)
    assert list(groups) == [] and groups.rejected["0"] == "output reaches 1 (Tanh) before any normalization"
    assert change(net, x, kind, lambda t: 2 * t) > CHANGED


def test_a_weight_stored_as_several_tensors_is_listed():
    net, x = build("halves", "conv")
    groups = find_invariant_groups(net, x)
    assert groups.rejected["0"] == "weight computed by parametrization `Halves` from 2 tensors, which is not followed"


def test_a_pruned_bias_that_must_join_the_groups_is_listed():
    """conv → ReLU → BN: the bias joins its channel's group, but pruning computes it from bias_orig."""
    conv = nn.Conv2d(3, 5, 3)
    prune.l1_unstructured(conv, "bias", amount=0.4)
    net = nn.Sequential(conv, nn.ReLU(), nn.BatchNorm2d(5, eps=EPS), nn.Flatten(), nn.Linear(45, 2))
    groups = find_invariant_groups(net, torch.randn(8, 3, 5, 5))
    assert groups.rejected["0"] == "bias computed by forward pre-hook `L1Unstructured`, which is not followed"


def test_the_numeric_test_names_a_stored_tensor_after_its_layer():
    net, x = build("spectral_norm", "conv")
    with pytest.warns(UserWarning, match="4: gradient not orthogonal"):  # the classifier
        groups = find_invariant_groups(net, x, groups="numeric")
    assert ("0", [STORED["spectral_norm"]], "channel", 5, "") in described(groups)


def state(net):
    """Every parameter and buffer (spectral norm's ``_u``, ``_v``), cloned."""
    return {name: t.detach().clone() for name, t in [*net.named_parameters(), *net.named_buffers()]}


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


ALL_KINDS = [*ROW_SCALING, "orthogonal"]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_detection_computes_no_weight_and_leaves_training_bitwise_unchanged(kind):
    """Before: reading ``module.weight`` ran spectral norm's power iteration, so that ``_u``, ``_v`` and every loss
    after differed."""
    net, x = build(kind, "conv")
    y = torch.randint(0, 2, (len(x),))
    before = state(net)
    find_invariant_groups(net, x)
    assert_bitwise_equal(state(net), before)

    def train(model, detect):
        if detect:
            find_invariant_groups(model, x)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for _ in range(3):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
        return torch.stack(losses), state(model)

    plain, with_detection = train(twin(net), False), train(twin(net), True)
    assert torch.equal(plain[0], with_detection[0])
    assert_bitwise_equal(plain[1], with_detection[1])


class Computed(Net):
    """``bn_net`` with its first conv's weight computed by ``kind``."""

    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(1)
        computed(kind, self.net[0])


@pytest.mark.parametrize("kind", ["spectral_norm", "legacy_spectral_norm", "l1_unstructured", "orthogonal"])
def test_the_monitor_without_correction_leaves_training_bitwise_unchanged(tmp_path, kind):
    """Before: spectral_norm's losses differed from the first step on, and net.0 was in neither list."""
    runs = {}
    for monitored in (False, True):
        model, monitor = Computed(kind), SphereMonitor()
        trainer = fit(model, tmp_path, [monitor] if monitored else [], max_steps=3)
        losses = [m["loss"] for _, m in trainer.logger.history if "loss" in m]
        runs[monitored] = (losses, state(model), monitor)
    assert runs[False][0] == runs[True][0] and len(runs[True][0]) == 3
    assert_bitwise_equal(runs[False][1], runs[True][1])
    monitor = runs[True][2]
    if kind == "orthogonal":
        assert "net.0: weight computed by parametrization `_Orthogonal`" in monitor.summary()
    else:
        first = monitor.groups[0]
        stored = STORED[kind].replace("0.", "net.0.", 1)
        assert (first.module_name, [s.name for s in first.slices], first.num_groups) == ("net.0", [stored], 6)


@pytest.mark.parametrize(("kind", "tracked"), [("mask", ["0.parametrizations.weight.original", "0.bias"]),
                                               ("spectral_norm", ["0.parametrizations.weight.original"])])  # fmt: skip
def test_a_bias_joins_only_a_weight_that_scales_exactly_with_its_rows(kind, tracked):
    """Linear → LayerNorm: the bias joins the layer's group. A mask scales the weight as the bias scales; spectral
    norm rescales every row by a common factor as well, which the bias does not follow: its weight and bias
    together are not invariant, its stored tensor alone is (W = V/σ(V) ignores V's scale)."""
    net = nn.Sequential(computed(kind, nn.Linear(12, 5)), nn.LayerNorm(5, eps=EPS), nn.Linear(5, 2))
    x = torch.randn(16, 12)
    groups = find_invariant_groups(net, x)
    assert [(g.granularity, [s.name for s in g.slices]) for g in groups] == [("layer", tracked)]

    def scaled(rho, with_bias):
        def output(model):
            with torch.no_grad():
                stepped(model, kind).mul_(rho)
                if with_bias:
                    model[0].bias.mul_(rho)
                return model(x.double())

        return output

    @torch.no_grad()
    def moved(how):
        reference = twin(net).double()(x.double())
        return float((how(twin(net).double()) - reference).abs().max() / reference.abs().max())

    assert moved(scaled(2.0, with_bias=len(tracked) == 2)) < UNCHANGED  # ground truth: what is tracked is invariant
    if kind == "spectral_norm":
        assert moved(scaled(2.0, with_bias=True)) > CHANGED  # weight and bias together are not


class TimesNorm(nn.Module):
    """W = V‖V‖: scales channel by channel, up to a common factor, and does not ignore V's scale."""

    def forward(self, weight):
        return weight * weight.norm()


def test_a_bias_that_cannot_follow_the_common_factor_is_the_reason():
    layer = nn.Linear(12, 5)
    parametrize.register_parametrization(layer, "weight", TimesNorm())
    net, x = nn.Sequential(layer, nn.LayerNorm(5, eps=EPS), nn.Linear(5, 2)), torch.randn(16, 12)
    groups = find_invariant_groups(net, x)
    assert groups.rejected["0"] == (
        "weight computed by parametrization `TimesNorm`, whose output scales with the rows of "
        "`0.parametrizations.weight.original` only up to a factor common to all of them, while the bias `0.bias` "
        "joins the groups and scales exactly"
    )
    with torch.no_grad():
        reference = twin(net).double()(x.double())
    for with_bias in (True, False):  # ground truth: neither the stored tensor with the bias nor without is invariant
        model = twin(net).double()
        with torch.no_grad():
            stepped(model, "").mul_(2.0)
            if with_bias:
                model[0].bias.mul_(2.0)
            assert float((model(x.double()) - reference).abs().max() / reference.abs().max()) > CHANGED


@pytest.mark.parametrize("kind", ROW_SCALING)
def test_the_norm_follows_a_channel_of_the_stored_tensor_only_where_the_weight_scales_exactly(kind):
    """``channels_aligned`` tells the correction that the norm's running statistics follow each group's scale. A
    mask scales the layer's output channel exactly as the stored channel; spectral norm adds a factor common to
    all channels (σ changes), which no per-group statistic follows."""
    net, x = build(kind, "conv")
    (entry,) = find_invariant_groups(net, x)
    factors = torch.ones(5, dtype=torch.float64)
    factors[2] = 2.0  # one channel of the stored tensor, doubled

    def pre_norm(scale):
        model = twin(net).double().train()
        with torch.no_grad():
            stepped(model, kind).mul_(scale.view(-1, 1, 1, 1))
            return model[0](x.double())

    reference, moved = pre_norm(torch.ones(5, dtype=torch.float64)), pre_norm(factors)
    bias = net[0].bias.detach().double().view(1, -1, 1, 1)
    exact = torch.allclose(moved - bias, (reference - bias) * factors.view(1, -1, 1, 1), rtol=1e-12, atol=1e-12)
    assert exact == (kind not in ("spectral_norm", "legacy_spectral_norm"))  # ground truth, computed here
    assert entry.channels_aligned == exact
