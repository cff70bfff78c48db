"""Normalizations recognized by what they compute, and degree-one paths followed to them (issue 10, items 7
and 13), each against a functional ground truth.

The ground truth never asks the package: a float64 copy of the model with every ``eps`` set tiny is run
with a group's rows scaled by ρ (2 and 0.5, and a different random factor per group at once); the groups
are invariant iff the output does not move.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sphere import find_invariant_groups
from lightning_sphere.detection.finder import GroupFinder

WIDTH, HEADS = 16, 4
HEAD_DIM = WIDTH // HEADS


# --- the ground truth -------------------------------------------------------------------------------------


def output_moves(
    model: nn.Module, x: Tensor, params: list[str], num_groups: int, rows: tuple[int, int] | None = None
) -> bool:
    """Whether scaling the ``num_groups`` consecutive blocks of output channels of ``params`` (only the
    channels ``rows``, if given) together moves the output of a float64 copy of ``model`` with tiny norm
    eps: by 2, by 0.5, and by a random factor per group. Output channels are dim 0 of each tensor (dim 1 of
    a ConvTranspose weight)."""
    torch.manual_seed(0)
    twin = copy.deepcopy(model).double().train()
    for module in twin.modules():
        if isinstance(getattr(module, "eps", None), float):
            module.eps = 1e-30
    x = x.double()
    tensors = []
    for param in params:
        owner = twin.get_submodule(param.rpartition(".")[0])
        dim = 1 if isinstance(owner, nn.ConvTranspose2d) and param.endswith("weight") else 0
        tensor = twin.get_parameter(param)
        tensors.append((tensor if rows is None else tensor[rows[0] : rows[1]], dim))
    with torch.no_grad():
        torch.manual_seed(1)
        reference = twin(x)
        saved = [t.clone() for t, _ in tensors]
        for factors in (torch.full((num_groups,), 2.0), torch.full((num_groups,), 0.5), torch.rand(num_groups) + 0.5):
            for t, dim in tensors:
                shape = [1] * t.dim()
                shape[dim] = t.shape[dim]
                t.mul_(factors.double().repeat_interleave(t.shape[dim] // num_groups).view(shape))
            torch.manual_seed(1)
            moved = not torch.allclose(twin(x), reference, rtol=1e-9, atol=1e-12)
            for (t, _), s in zip(tensors, saved, strict=True):
                t.copy_(s)
            if moved:
                return True
    return False


def candidates(model: nn.Module, x: Tensor) -> GroupFinder:
    """A finder that has read the candidates off the graph of one forward pass."""
    finder = GroupFinder(model)
    finder.start()
    out = model(x)
    finder.stop()
    finder.analyze([out])
    return finder


def detected(model: nn.Module, x: Tensor) -> tuple[dict[str, tuple], dict[str, str]]:
    """The candidates read off the graph: module → (groups, parameter names[, channel range]), and the
    rejected modules."""
    finder = candidates(model, x)
    found = {}
    for g in finder.pending:
        found[g.module_name] = (g.num_groups, [s.name for s in g.slices])
        if g.slices[0].channels is not None:
            found[g.module_name] += (g.slices[0].channels,)
    return found, finder.rejected


def check(model: nn.Module, x: Tensor, invariant: dict[str, tuple], rejected: dict[str, str]):
    """Detection finds exactly ``invariant`` and rejects ``rejected`` with the given words; the ground truth
    agrees: each detected group is invariant, and each rejected layer is not even as a whole."""
    torch.manual_seed(0)
    found, reasons = detected(model, x)
    assert found == invariant
    for name, words in rejected.items():
        assert words in reasons[name], (name, reasons[name])
    for name, (num_groups, params, *rows) in invariant.items():
        assert not output_moves(model, x, params, num_groups, *rows), name
    for name in rejected:
        layer = model.get_submodule(name)
        params = [f"{name}.weight"] + ([f"{name}.bias"] if getattr(layer, "bias", None) is not None else [])
        assert output_moves(model, x, params, 1), name


def assert_finer_groups_move(model: nn.Module, x: Tensor, params: list[str], num_groups: int) -> None:
    """The detected groups are the finest: twice as many (when the rows allow) are not invariant."""
    rows = model.get_parameter(params[0]).shape[0]
    if rows % (2 * num_groups) == 0:
        assert output_moves(model, x, params, 2 * num_groups)


# --- normalizations written the ways users write them -----------------------------------------------------


class HFRMSNorm(nn.Module):
    """Hugging Face's LlamaRMSNorm / Qwen3RMSNorm, as written there."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.to(torch.float32) if dtype != torch.float64 else x
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(dtype)


class FunctionalRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.size, self.eps = size, eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (self.size,), self.weight, self.eps)


class FunctionalLayerNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.size, self.eps = size, eps
        self.weight, self.bias = nn.Parameter(torch.ones(size)), nn.Parameter(torch.zeros(size))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (self.size,), self.weight, self.bias, self.eps)


class Attention(nn.Module):
    """Llama/Qwen3-style attention with QK-norm per head; ``post_norm`` adds OLMo2's post-attention norm."""

    def __init__(self, norm: type[nn.Module], post_norm: bool = False, o_bias: bool = False) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(3))
        self.o_proj = nn.Linear(WIDTH, WIDTH, bias=o_bias)
        self.q_norm, self.k_norm = norm(HEAD_DIM), norm(HEAD_DIM)
        self.post_attention_layernorm = norm(WIDTH) if post_norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape

        def heads(y: Tensor) -> Tensor:
            return y.view(b, t, HEADS, HEAD_DIM)

        q = self.q_norm(heads(self.q_proj(x))).transpose(1, 2)
        k = self.k_norm(heads(self.k_proj(x))).transpose(1, 2)
        v = heads(self.v_proj(x)).transpose(1, 2)
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, WIDTH)
        return x + self.post_attention_layernorm(self.o_proj(attention))


TOKENS = torch.randn(4, 5, WIDTH, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("norm", [HFRMSNorm, nn.RMSNorm, FunctionalRMSNorm, FunctionalLayerNorm])
def test_qk_norm_per_head_is_found_whatever_class_computes_it(norm):
    """Before: HFRMSNorm's q_proj was rejected with "output is used besides the normalization"."""
    model = Attention(norm)
    check(
        model,
        TOKENS,
        {"q_proj": (HEADS, ["q_proj.weight"]), "k_proj": (HEADS, ["k_proj.weight"])},
        {"v_proj": "Add", "o_proj": "Add"},
    )
    assert_finer_groups_move(model, TOKENS, ["q_proj.weight"], HEADS)
    norms = {g.module_name: (g.norm_name, g.norm_type) for g in candidates(model, TOKENS).pending}
    assert norms["q_proj"] == ("q_norm", norm.__name__)


class LayerNorm2d(nn.LayerNorm):
    """timm's channels-first LayerNorm: permute, ``F.layer_norm`` over channels, permute back."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class FunctionalGroupNorm(nn.Module):
    def __init__(self, groups: int, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.groups, self.weight, self.bias, self.eps)


class FunctionalBatchNorm(nn.Module):
    """Batch statistics always (``training=True``, no running statistics), as some GAN codebases write it."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)


class ConvNorm(nn.Module):
    """conv → norm → ReLU → pooled linear head."""

    def __init__(self, norm: nn.Module, bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.norm = norm
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.norm(self.conv(x))).mean((2, 3)))


IMAGES = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("norm", "groups", "with_bias"),
    [
        (LayerNorm2d(8), 1, True),  # every channel of a pixel together: the whole layer
        (FunctionalGroupNorm(2, 8), 2, True),
        (FunctionalBatchNorm(8), 8, False),  # centres each channel: the bias cancels
        (nn.InstanceNorm2d(8, affine=True), 8, False),
    ],
)
def test_functional_norms_inside_user_modules(norm, groups, with_bias):
    params = ["conv.weight", "conv.bias"] if with_bias else ["conv.weight"]
    model = ConvNorm(norm)
    check(model, IMAGES, {"conv": (groups, params)}, {"head": "reaches the model's output"})
    assert_finer_groups_move(model, IMAGES, params, groups)
    (entry,) = candidates(model, IMAGES).pending
    assert (entry.norm_name, entry.norm_type) == ("norm", type(norm).__name__)


def test_layer_norm_2d_output_also_added_back_is_used_besides_the_normalization():
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm = nn.Conv2d(8, 8, 3, padding=1), LayerNorm2d(8)

        def forward(self, x: Tensor) -> Tensor:
            y = self.conv(x)
            return self.norm(y) + y

    check(Residual(), torch.randn(4, 8, 6, 6), {}, {"conv": "used besides the normalization"})


def test_batch_norm_in_eval_mode_is_named_with_its_module():
    model = ConvNorm(nn.BatchNorm2d(8))
    model.norm.eval()
    _, rejected = detected(model, IMAGES)
    assert rejected["conv"] == "norm (BatchNorm2d) uses running statistics (eval mode)"


# --- weight standardization: the weight is normalized, whatever follows -----------------------------------


class StdConv2d(nn.Conv2d):
    """timm's StdConv2d: the weight standardized per output channel by ``F.batch_norm``."""

    def __init__(self, *args, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=self.eps
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """timm's ScaledStdConv2d: a learned gain, and the fan-in folded into the standardization."""

    def __init__(self, *args, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))
        self.scale = self.weight[0].numel() ** -0.5
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1),
            None,
            None,
            weight=(self.gain * self.scale).view(-1),
            training=True,
            momentum=0.0,
            eps=self.eps,
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class MeanStdConv2d(nn.Conv2d):
    """Weight standardization written out: mean and std per output channel. ``whole``: over the whole
    tensor instead (invariant as one group); ``center_only``: no division (not invariant)."""

    def __init__(self, *args, whole: bool = False, center_only: bool = False, eps: float = 1e-5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.whole, self.center_only, self.eps = whole, center_only, eps

    def forward(self, x: Tensor) -> Tensor:
        dims = (0, 1, 2, 3) if self.whole else (1, 2, 3)
        weight = self.weight - self.weight.mean(dims, keepdim=True)
        if not self.center_only:
            weight = weight / (weight.std(dims, keepdim=True) + self.eps)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


class NFBlock(nn.Module):
    """NFNet-style: standardized convs, GELU, no activation normalization; a plain head."""

    def __init__(self, conv: type[nn.Conv2d], **kwargs) -> None:
        super().__init__()
        self.conv1 = conv(3, 8, 3, padding=1, **kwargs)
        self.conv2 = conv(8, 8, 3, padding=1, bias=False, **kwargs)
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return self.head(h.mean((2, 3)) + 0.5)


@pytest.mark.parametrize("conv", [StdConv2d, ScaledStdConv2d, MeanStdConv2d])
def test_weight_standardized_convs_are_invariant_per_output_channel(conv):
    model = NFBlock(conv)
    check(
        model,
        IMAGES,
        {"conv1": (8, ["conv1.weight"]), "conv2": (8, ["conv2.weight"])},
        {"head": "reaches the model's output"},
    )
    entry = next(g for g in candidates(model, IMAGES).pending if g.module_name == "conv1")
    assert (entry.norm_name, entry.norm_type, entry.granularity) == ("conv1", conv.__name__, "channel")


def test_weight_standardized_over_the_whole_tensor_is_one_group_and_centering_alone_is_none():
    whole = {"conv1": (1, ["conv1.weight"]), "conv2": (1, ["conv2.weight"])}
    check(NFBlock(MeanStdConv2d, whole=True), IMAGES, whole, {})
    assert output_moves(NFBlock(MeanStdConv2d, whole=True), IMAGES, ["conv1.weight"], 8)
    check(NFBlock(MeanStdConv2d, center_only=True), IMAGES, {}, {"conv1": "Gelu", "conv2": "Gelu"})


def test_weight_standardized_convs_pass_verification():
    torch.manual_seed(0)
    groups = find_invariant_groups(NFBlock(StdConv2d), IMAGES)
    assert sorted(g.module_name for g in groups) == ["conv1", "conv2"]
    assert all(g.cosine < 1e-3 for g in groups), [g.cosine for g in groups]


# --- degree-one paths: bias-free linear maps, products with what does not depend on the layer -------------


@pytest.mark.parametrize("norm", [HFRMSNorm, nn.RMSNorm])
def test_post_attention_norm_makes_v_and_o_projections_whole_layer_invariant(norm):
    """OLMo2: ``x + post_attention_layernorm(o_proj(attention(q, k, v)))``. v reaches the norm through the
    attention probabilities (which do not depend on it) and the bias-free o_proj. Before: "reaches Sdpa"."""
    model = Attention(norm, post_norm=True)
    check(
        model,
        TOKENS,
        {
            "q_proj": (HEADS, ["q_proj.weight"]),
            "k_proj": (HEADS, ["k_proj.weight"]),
            "v_proj": (1, ["v_proj.weight"]),
            "o_proj": (1, ["o_proj.weight"]),
        },
        {},
    )
    assert_finer_groups_move(model, TOKENS, ["v_proj.weight"], 1)
    assert_finer_groups_move(model, TOKENS, ["o_proj.weight"], 1)


class GroupedQueryAttention(Attention):
    """``Attention`` with half as many key/value heads as query heads, SDPA repeating each (``enable_gqa``),
    as Gemma 3 and OLMo2 configurations with ``num_key_value_heads < num_attention_heads`` run it."""

    def __init__(self) -> None:
        super().__init__(nn.RMSNorm, post_norm=True)
        self.k_proj, self.v_proj = (nn.Linear(WIDTH, WIDTH // 2, bias=False) for _ in range(2))

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, HEADS, HEAD_DIM)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, HEADS // 2, HEAD_DIM)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, HEADS // 2, HEAD_DIM).transpose(1, 2)
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return x + self.post_attention_layernorm(self.o_proj(attention.transpose(1, 2).reshape(b, t, WIDTH)))


def test_grouped_query_attention_repeats_the_value_heads():
    """Before: the walk's channel map did not follow SDPA's repetition of the key/value heads, and v_proj was
    left out ("reaches ScaledDotProductFlashAttentionForCpu, not followed") in HF OLMo2 and Gemma 3."""
    model = GroupedQueryAttention()
    check(
        model,
        TOKENS,
        {
            "q_proj": (HEADS, ["q_proj.weight"]),
            "k_proj": (HEADS // 2, ["k_proj.weight"]),
            "v_proj": (1, ["v_proj.weight"]),
            "o_proj": (1, ["o_proj.weight"]),
        },
        {},
    )
    assert_finer_groups_move(model, TOKENS, ["v_proj.weight"], 1)


def test_a_bias_on_the_way_to_the_post_norm_breaks_it():
    model = Attention(nn.RMSNorm, post_norm=True, o_bias=True)
    check(
        model,
        TOKENS,
        {
            "q_proj": (HEADS, ["q_proj.weight"]),
            "k_proj": (HEADS, ["k_proj.weight"]),
            "o_proj": (1, ["o_proj.weight", "o_proj.bias"]),
        },
        {"v_proj": "Addmm"},
    )


class SwiGLU(nn.Module):
    """Gemma-style MLP with a post-feedforward norm: ``norm(down(silu(gate(x)) * up(x)))``."""

    def __init__(self, down_bias: bool = False) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(WIDTH, 32, bias=False), nn.Linear(WIDTH, 32, bias=False)
        self.down_proj = nn.Linear(32, WIDTH, bias=down_bias)
        self.post_feedforward_layernorm = HFRMSNorm(WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        return x + self.post_feedforward_layernorm(self.down_proj(h))


def test_swiglu_up_projection_is_invariant_through_the_gate_and_the_bias_free_down_projection():
    model = SwiGLU()
    check(
        model,
        TOKENS,
        {"up_proj": (1, ["up_proj.weight"]), "down_proj": (1, ["down_proj.weight"])},
        {"gate_proj": "Silu"},
    )
    assert_finer_groups_move(model, TOKENS, ["up_proj.weight"], 1)


def test_swiglu_with_a_biased_down_projection_leaves_up_out():
    check(
        SwiGLU(down_bias=True),
        TOKENS,
        {"down_proj": (1, ["down_proj.weight", "down_proj.bias"])},
        {"up_proj": "Addmm", "gate_proj": "Silu"},
    )


@pytest.mark.parametrize(("down_bias", "tracked"), [(False, True), (True, False)])
def test_rms_norm_after_two_linears(down_bias, tracked):
    """``nn.RMSNorm(d)(down(up(x)))``: ``up`` is whole-layer invariant iff ``down`` has no bias."""
    model = nn.Sequential()
    model.up, model.down, model.norm = nn.Linear(WIDTH, 32), nn.Linear(32, WIDTH, bias=down_bias), nn.RMSNorm(WIDTH)
    down = (1, ["down.weight", "down.bias"] if down_bias else ["down.weight"])
    if tracked:
        check(model, TOKENS, {"up": (1, ["up.weight", "up.bias"]), "down": down}, {})
    else:
        check(model, TOKENS, {"down": down}, {"up": "Addmm"})


class EinsumAttention(nn.Module):
    """Attention written with einsum and softmax (the math path), values per head, then a BatchNorm over
    the value channels: each value channel reaches its own BatchNorm channel through ``probs @ v``."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(3))
        self.bn = nn.BatchNorm1d(WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, HEADS, HEAD_DIM) for f in (self.q, self.k, self.v))
        probs = torch.einsum("bqhd,bkhd->bhqk", q, k).softmax(-1)
        out = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, WIDTH)
        return self.bn(out.transpose(1, 2))


def test_einsum_attention_values_keep_their_channels():
    check(EinsumAttention(), TOKENS, {"v": (WIDTH, ["v.weight"])}, {"q": "Softmax", "k": "Softmax"})


# --- channels followed through concatenations and splits (item 12) ----------------------------------------


class DenseBlock(nn.Module):
    """DenseNet: every layer normalizes the concatenation of all earlier features, channel by channel."""

    def __init__(self, cin: int = 3, growth: int = 4, layers: int = 3) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.BatchNorm2d(cin + i * growth) for i in range(layers))
        self.convs = nn.ModuleList(nn.Conv2d(cin + i * growth, growth, 3, padding=1) for i in range(layers))
        self.final = nn.BatchNorm2d(cin + layers * growth)
        self.head = nn.Linear(cin + layers * growth, 5)

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for norm, conv in zip(self.norms, self.convs, strict=True):
            features.append(conv(F.relu(norm(torch.cat(features, 1)))))
        return self.head(F.relu(self.final(torch.cat(features, 1))).mean((2, 3)))


def test_densenet_convs_are_normalized_channel_by_channel_wherever_their_output_goes():
    """Before: the first conv "is used besides the normalization", the last "reaches Cat"."""
    model = DenseBlock()
    convs = {f"convs.{i}": (4, [f"convs.{i}.weight"]) for i in range(3)}  # every BN centres: biases cancel
    check(model, IMAGES, convs, {"head": "reaches the model's output"})


class SplitNorms(nn.Module):
    """One conv, its channels split in two halves, each normalized by its own BatchNorm; ``group_norm``:
    the second half goes through a GroupNorm together with channels from elsewhere instead."""

    def __init__(self, group_norm: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.side = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(1, 8) if group_norm else None
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.conv(x).chunk(2, dim=1)
        b = self.bn_b(b) if self.gn is None else self.gn(torch.cat([b, self.side(x)], 1))[:, :4]
        return self.head(torch.cat([self.bn_a(a), b], 1).relu().mean((2, 3)))


def test_channel_slices_feeding_per_channel_norms():
    check(SplitNorms(), IMAGES, {"conv": (8, ["conv.weight"])}, {})


def test_a_norm_that_mixes_the_layer_with_other_channels_breaks_it():
    """The second half of conv is normalized together with side's channels: neither scales alone. The first
    half still has its own BatchNorm: those rows are tracked, as a channel range."""
    model = SplitNorms(group_norm=True)
    check(model, IMAGES, {"conv": (4, ["conv.weight"], (0, 4))}, {"side": "together with values that do not scale"})
    assert output_moves(model, IMAGES, ["conv.weight"], 4, (4, 8))


# --- fused qkv projections (item 11) ----------------------------------------------------------------------


class FusedQKV(nn.Module):
    """timm's ViT attention with ``qk_norm=True``: one Linear makes q, k and v, reshaped to
    ``(3, B, heads, T, head_dim)`` and unbound; per-head LayerNorms on q and k. ``split``: the LLM way,
    ``qkv.split(width, -1)`` then a view per head."""

    def __init__(self, split: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.split = split
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH, bias=bias)
        self.q_norm, self.k_norm = nn.LayerNorm(HEAD_DIM), HFRMSNorm(HEAD_DIM)
        self.proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        if self.split:
            q, k, v = (y.view(b, t, HEADS, HEAD_DIM).transpose(1, 2) for y in self.qkv(x).split(WIDTH, -1))
        else:
            q, k, v = self.qkv(x).reshape(b, t, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attention = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, WIDTH)
        return x + self.proj(attention)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_qkv_tracks_the_q_and_k_head_rows(split, bias):
    """Before: the whole qkv layer was left out ("reaches Sdpa"). Its v rows are not invariant."""
    model = FusedQKV(split, bias)
    params = ["qkv.weight", "qkv.bias"] if bias else ["qkv.weight"]
    check(model, TOKENS, {"qkv": (2 * HEADS, params, (0, 2 * WIDTH))}, {"proj": "Add"})
    assert output_moves(model, TOKENS, params, 1, (2 * WIDTH, 3 * WIDTH))  # v rows
    assert output_moves(model, TOKENS, params, 4 * HEADS, (0, 2 * WIDTH))  # half heads
    (entry,) = find_invariant_groups(model, TOKENS)
    assert (entry.module_name, entry.num_groups, entry.group_size) == ("qkv", 8, HEAD_DIM * (WIDTH + bias))
    assert entry.numel == 2 * WIDTH * (WIDTH + bias)


def test_the_rows_left_out_sit_between_invariant_ones_then_nothing_is_tracked():
    """k, v, q order: the invariant rows are not one run; the layer is rejected with the first reason."""

    class KVQ(FusedQKV):
        def forward(self, x: Tensor) -> Tensor:
            b, t, _ = x.shape
            k, v, q = (y.view(b, t, HEADS, HEAD_DIM).transpose(1, 2) for y in self.qkv(x).split(WIDTH, -1))
            attention = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
            return x + self.proj(attention.transpose(1, 2).reshape(b, t, WIDTH))

    check(KVQ(), TOKENS, {}, {"qkv": "Addmm"})


@pytest.mark.parametrize("correction", [None, "srt"])
def test_fused_qkv_rows_are_measured_and_corrected_and_v_rows_step_plainly(correction):
    """The tracker's angular updates of the q and k head groups against a float64 reference computed from
    the rows of the weight and bias before and after the step; with the AdamSRT correction on, the v rows
    still take Adam's plain step, bit for bit (first step: later the corrected q, k change v's gradient)."""
    from lightning_sphere import SphereTracker
    from tests import reference

    torch.manual_seed(0)
    model = FusedQKV().double()
    x = TOKENS.double()
    groups = find_invariant_groups(model, x)
    twin = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    plain = torch.optim.Adam(twin.parameters(), lr=1e-2)
    tracker = SphereTracker(groups, [optimizer], correction=correction, model=model)

    def heads(m: nn.Module) -> Tensor:  # (2 * HEADS, d): weight rows and bias entries of each q/k head
        w, b = m.qkv.weight.detach()[: 2 * WIDTH], m.qkv.bias.detach()[: 2 * WIDTH]
        return torch.cat([w.reshape(2 * HEADS, -1), b.reshape(2 * HEADS, -1)], 1).clone()

    for step in range(2):
        tracker.arm(histograms=True)
        before = heads(model)
        for m, opt in ((model, optimizer), (twin, plain)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
        measurement = tracker.collect()
        theta = reference.group_metrics(before, heads(model), before, 1e-2)["angular_update"]
        torch.testing.assert_close(measurement.histograms["sphere_hist/angular_update/qkv"], theta, rtol=1e-9, atol=0)
        if step == 0:
            assert torch.equal(model.qkv.weight[2 * WIDTH :], twin.qkv.weight[2 * WIDTH :])
            assert torch.equal(model.qkv.bias[2 * WIDTH :], twin.qkv.bias[2 * WIDTH :])
    changed = not torch.equal(model.qkv.weight[: 2 * WIDTH], twin.qkv.weight[: 2 * WIDTH])
    assert changed == (correction is not None)


class Normalized(nn.Module):
    """``F.normalize`` over the features (cosine classifiers, SimCLR heads); ``floor``: a clamp at a
    non-zero floor before a BatchNorm instead (not homogeneous)."""

    def __init__(self, floor: float | None = None) -> None:
        super().__init__()
        self.floor = floor
        self.proj = nn.Linear(WIDTH, 8)
        self.bn = nn.BatchNorm1d(5)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x)
        h = F.normalize(h, dim=-1) if self.floor is None else self.bn(h.clamp_min(self.floor))
        return self.head(h)


def test_f_normalize_makes_the_layer_one_group_and_a_clamp_above_zero_breaks_a_path():
    check(Normalized(), TOKENS, {"proj": (1, ["proj.weight", "proj.bias"])}, {"head": "reaches the model's output"})
    check(Normalized(floor=0.1), TOKENS, {}, {"proj": "ClampMin"})


def test_a_plain_bias_free_conv_is_not_mistaken_for_a_standardized_one():
    """Its weight reaches the BatchNorm only through the conv itself: the BatchNorm names the groups, and its
    running statistics are one per group."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))
    (entry,) = candidates(model, IMAGES).pending
    assert (entry.norm_name, entry.norm_type, entry.channels_aligned) == ("1", "BatchNorm2d", True)


class SkipInitBlock(nn.Module):
    """NFNet's residual block as built: ``x + gain · conv2(gelu(conv1(x)))`` with the gain zero-initialized
    (skipinit), weight-standardized convs: the output gives them no gradient on the first batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = ScaledStdConv2d(3, 3, 3, padding=1), ScaledStdConv2d(3, 3, 3, padding=1)
        self.gain = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.gain * self.conv2(F.gelu(self.conv1(x)))


def test_a_weight_standardized_layer_is_probed_on_its_own_output():
    """timm's NFNet as built: 9 of its 21 invariant convs were found, the others had "no gradient on the
    example input". A weight-standardized layer normalizes its own weight, so a random cotangent on its
    output verifies it (and the gain's zero keeps the model's output independent of both convs)."""
    torch.manual_seed(0)
    model = SkipInitBlock()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    found = find_invariant_groups(model, x)
    assert sorted(g.module_name for g in found) == ["conv1", "conv2"]
    assert all(g.num_groups == 3 and g.cosine < 1e-4 for g in found)  # float32; a random direction: 0.19


# --- a bias between the layer and its normalization (issue 25, kind 3) ------------------------------------


class BiasBetween(nn.Module):
    """``conv`` → ReLU → ``mix`` (1×1, with a bias) → ``norm``: the layer's scale reaches the norm through a bias,
    as timm's StarNet has ``act(f1(x)) * f2(x) → conv(bias) → BN``. ``relu_after_bias``: a ReLU between the bias and
    the norm (it does not commute with the shift: the constant stops being a per-channel one)."""

    def __init__(self, norm: nn.Module, relu_after_bias: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.mix = nn.Conv2d(8, 6, 1)
        self.norm, self.relu_after_bias = norm, relu_after_bias
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mix(F.relu(self.conv(x)))
        h = F.relu(h) if self.relu_after_bias else h
        return self.head(F.relu(self.norm(h)).mean((2, 3)))


class LinearBiasBetween(nn.Module):
    """The same with ``nn.Linear`` layers and ``BatchNorm1d`` (the bias added by ``addmm``)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.mix, self.bn, self.head = (
            nn.Linear(5, 8, bias=False),
            nn.Linear(8, 6),
            nn.BatchNorm1d(6),
            nn.Linear(6, 2),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.bn(self.mix(F.relu(self.up(x))))))


def test_a_bias_a_batch_norm_cancels_keeps_the_layer_before_it_invariant():
    # Before: "conv: output reaches Convolution (a bias on the way) before any normalization"; the ground truth
    # (scaling conv by any positive factors leaves the float64 output unchanged) says it is invariant, as a whole:
    # mix ties its channels. mix's own bias joins nothing: the batch norm cancels it.
    model = BiasBetween(nn.BatchNorm2d(6)).double()
    check(model, IMAGES.double(), {"conv": (1, ["conv.weight"]), "mix": (6, ["mix.weight"])}, {})
    assert_finer_groups_move(model, IMAGES.double(), ["conv.weight"], 1)
    linear = LinearBiasBetween().double()
    x = torch.randn(16, 5, dtype=torch.float64)
    check(linear, x, {"up": (1, ["up.weight"]), "mix": (6, ["mix.weight"])}, {"head": "reaches the model's output"})


@pytest.mark.parametrize(
    ("norm", "relu_after_bias", "reason"),
    [
        (nn.GroupNorm(2, 6), False, "reaches mix (Conv2d: Convolution), whose bias norm (GroupNorm: NativeGroupNorm)"),
        (nn.BatchNorm2d(6), True, "reaches mix (Conv2d: Convolution), whose bias no normalization of each channel"),
    ],
)
def test_a_bias_no_normalization_cancels_is_named(norm, relu_after_bias, reason):
    # A group's mean, or a ReLU after the bias, leaves the bias's constant in: conv is not invariant (ground truth)
    model = BiasBetween(norm, relu_after_bias).double()
    found, _ = detected(model, IMAGES.double())
    check(model, IMAGES.double(), {k: v for k, v in found.items() if k != "conv"}, {"conv": reason})


# --- one entry per group (issue 25, kind 2) -----------------------------------------------------------------


def test_a_one_entry_group_is_listed_with_the_true_reason():
    # timm's FastViT scales each channel by a depthwise [C, 1, 1, 1] conv before a BatchNorm: invariant (the ground
    # truth below), but with one entry a group's gradient is round-off and |cos(g, x)| reads 1 at any eps; it was
    # rejected as "invariant only up to the eps" and is now listed as what it is.
    from lightning_sphere import find_invariant_groups

    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 1, groups=6, bias=False), nn.BatchNorm2d(6),
        nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 2),
    ).double()  # fmt: skip
    with pytest.warns(UserWarning, match="one entry per group"):
        groups = find_invariant_groups(model, IMAGES.double())
    assert groups.rejected["2"].startswith("one entry per group (d = 1, 6 groups): a group's direction is its sign")
    assert "the eps of" not in groups.rejected["2"]
    assert not output_moves(model, IMAGES.double(), ["2.weight"], 6)  # invariant channel by channel, as the reason says
