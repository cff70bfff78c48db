"""Architectures users bring, each with its radially invariant groups counted by hand.

Every entry of ``EXPECTED`` gives, per tracked module: the number of groups, the group size d, the
normalization, the granularity, and a function that builds the groups as rows ``(G, d)`` from any view
of the parameters (the weights or their gradients) — written here, independently of the package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

Get = Callable[[nn.Parameter], Tensor]


def per_row(weight: Tensor, groups: int) -> Tensor:
    return weight.reshape(groups, -1)


def with_bias(weight: Tensor, bias: Tensor, groups: int) -> Tensor:
    """Weight rows and bias entries of each group side by side (channels are consecutive in dim 0)."""
    return torch.cat([weight.reshape(groups, -1), bias.reshape(groups, -1)], 1)


@dataclass
class Group:
    num_groups: int
    dim: int
    norm: str
    granularity: str
    rows: Callable[[nn.Module, Get], Tensor]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = BasicBlock(8, 8, 1)
        self.layer2 = BasicBlock(8, 16, 2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer2(self.layer1(F.relu(self.bn(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


def vgg_bn() -> nn.Module:
    model = nn.Sequential()
    model.features = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip
    model.classifier = nn.Sequential(nn.Linear(16, 32), nn.ReLU(True), nn.Dropout(0.5), nn.Linear(32, 10))
    return model


def mobilenet() -> nn.Module:
    def block(cin: int, cout: int, kernel: int, groups: int = 1) -> nn.Sequential:
        conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False)
        return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU6())

    model = nn.Sequential()
    model.stem = block(3, 8, 3)
    model.depthwise = block(8, 8, 3, groups=8)
    model.pointwise = block(8, 16, 1)
    model.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.fc = nn.Linear(16, 10)
    return model


class UNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2, bias=False)
        self.up_bn = nn.BatchNorm2d(8)
        self.dec = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, 10, 1)

    def forward(self, x: Tensor) -> Tensor:
        skip = self.enc1(x)
        up = F.relu(self.up_bn(self.up(self.enc2(F.max_pool2d(skip, 2)))))
        return self.head(self.dec(torch.cat([up, skip], 1))).mean((2, 3))


class GroupNormBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.gn1 = nn.GroupNorm(4, 16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.gn2 = nn.GroupNorm(4, 16)
        self.shortcut = nn.Conv2d(3, 16, 1)
        self.gn_shortcut = nn.GroupNorm(4, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        out = self.gn2(self.conv2(F.relu(self.gn1(self.conv1(x)))))
        return self.fc(F.relu(out + self.gn_shortcut(self.shortcut(x))).mean((2, 3)))


class Transformer(nn.Module):
    """A pre-LN transformer block with QK-norm (RMSNorm over each head), on sequences of 8-d tokens."""

    def __init__(self, width: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.embed = nn.Linear(8, width)
        self.ln1 = nn.LayerNorm(width)
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.q_norm, self.k_norm = nn.RMSNorm(self.head_dim), nn.RMSNorm(self.head_dim)
        self.out = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        a = self.ln1(h)
        b, t, width = a.shape

        def split(y: Tensor) -> Tensor:
            return y.view(b, t, self.heads, self.head_dim)

        q = self.q_norm(split(self.q(a))).transpose(1, 2)
        k = self.k_norm(split(self.k(a))).transpose(1, 2)
        v = split(self.v(a)).transpose(1, 2)
        attention = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, width)
        h = h + self.out(attention)
        h = h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
        return self.head(h.mean(1))


def bn_mlp() -> nn.Module:
    model = nn.Sequential()
    model.flat = nn.Flatten()
    model.fc1, model.bn1, model.act1 = nn.Linear(3 * 8 * 8, 32), nn.BatchNorm1d(32), nn.ReLU()
    model.fc2, model.bn2, model.act2 = nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU()
    model.fc3 = nn.Linear(32, 10)
    return model


def ln_mlp() -> nn.Module:
    """Post-LN MLP: LayerNorm over the whole output makes the layer (weight and bias) one group."""
    model = nn.Sequential()
    model.flat = nn.Flatten()
    model.fc1, model.ln1, model.act1 = nn.Linear(3 * 8 * 8, 32), nn.LayerNorm(32), nn.ReLU()
    model.fc2 = nn.Linear(32, 10)
    return model


def weight_normed_mlp() -> nn.Module:
    model = nn.Sequential()
    model.flat = nn.Flatten()
    model.fc1, model.act = weight_norm(nn.Linear(3 * 8 * 8, 32)), nn.ReLU()
    model.fc2 = weight_norm(nn.Linear(32, 10))
    return model


class Adaptive(nn.Module):
    """Data-dependent control flow: a block applied a batch-dependent number of times, and a branch."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.left = nn.Sequential(nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4))
        self.right = nn.Sequential(nn.Conv2d(8, 4, 1, bias=False), nn.GELU(), nn.BatchNorm2d(4))
        self.fc = nn.Linear(4, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for _ in range(1 + int(h.abs().mean() > 0)):  # twice on real data: the block's weights are shared
            h = self.block(h)
        h = self.left(h) if h.mean() > -1e9 else self.right(h)
        return self.fc(h.mean((2, 3)))


class Negatives(nn.Module):
    """Conv → GELU → BN, a conv output also added to a residual, and a classifier: nothing invariant."""

    def __init__(self) -> None:
        super().__init__()
        self.gelu_conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.residual_conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn1(F.gelu(self.gelu_conv(x)))
        y = self.residual_conv(h)
        return self.fc((self.bn2(y) + y).mean((2, 3)))


IMAGES = (8, 3, 8, 8)
TOKENS = (8, 5, 8)


def rows(param: str, groups: int) -> Callable[[nn.Module, Get], Tensor]:
    return lambda m, get: per_row(get(m.get_parameter(param)), groups)


def conv(attr: str, groups: int) -> Callable[[nn.Module, Get], Tensor]:
    return rows(f"{attr}.weight", groups)


def conv_bias(attr: str, groups: int) -> Callable[[nn.Module, Get], Tensor]:
    return lambda m, get: with_bias(
        get(m.get_parameter(f"{attr}.weight")), get(m.get_parameter(f"{attr}.bias")), groups
    )


#: model factory, input shape, tracked modules, and rejected modules with a word of their reason.
ZOO: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], dict[str, Group], dict[str, str]]] = {
    "resnet": (
        ResNet,
        IMAGES,
        {
            "stem": Group(8, 27, "bn", "channel", conv("stem", 8)),
            "layer1.conv1": Group(8, 72, "layer1.bn1", "channel", conv("layer1.conv1", 8)),
            "layer1.conv2": Group(8, 72, "layer1.bn2", "channel", conv("layer1.conv2", 8)),
            "layer2.conv1": Group(16, 72, "layer2.bn1", "channel", conv("layer2.conv1", 16)),
            "layer2.conv2": Group(16, 144, "layer2.bn2", "channel", conv("layer2.conv2", 16)),
            "layer2.shortcut.0": Group(16, 8, "layer2.shortcut.1", "channel", conv("layer2.shortcut.0", 16)),
        },
        {"fc": "reaches the model's output"},
    ),
    "vgg": (
        vgg_bn,
        IMAGES,
        {
            "features.0": Group(8, 27, "features.1", "channel", conv("features.0", 8)),
            "features.3": Group(8, 72, "features.4", "channel", conv("features.3", 8)),
            "features.7": Group(16, 72, "features.8", "channel", conv("features.7", 16)),
        },
        {
            "classifier.0": "reaches classifier.3 (Linear: Addmm), then the model's output",
            "classifier.3": "reaches the model's output",
        },
    ),
    "mobilenet": (
        mobilenet,
        IMAGES,
        {
            "stem.0": Group(8, 27, "stem.1", "channel", conv("stem.0", 8)),
            "depthwise.0": Group(8, 9, "depthwise.1", "channel", conv("depthwise.0", 8)),
            "pointwise.0": Group(16, 8, "pointwise.1", "channel", conv("pointwise.0", 16)),
        },
        {"fc": "reaches the model's output"},
    ),
    "unet": (
        UNet,
        IMAGES,
        {
            "enc1.0": Group(8, 27, "enc1.1", "channel", conv("enc1.0", 8)),
            "enc2.0": Group(16, 72, "enc2.1", "channel", conv("enc2.0", 16)),
            "up": Group(8, 64, "up_bn", "channel", lambda m, get: get(m.up.weight).transpose(0, 1).reshape(8, -1)),
            "dec.0": Group(8, 144, "dec.1", "channel", conv("dec.0", 8)),
        },
        {"head": "reaches the model's output"},
    ),
    "groupnorm": (
        GroupNormBlock,
        IMAGES,
        {
            "conv1": Group(4, 4 * 27 + 4, "gn1", "4 channels", conv_bias("conv1", 4)),
            "conv2": Group(4, 4 * 144 + 4, "gn2", "4 channels", conv_bias("conv2", 4)),
            "shortcut": Group(4, 4 * 3 + 4, "gn_shortcut", "4 channels", conv_bias("shortcut", 4)),
        },
        {"fc": "reaches the model's output"},
    ),
    "transformer": (
        Transformer,
        TOKENS,
        {
            "q": Group(4, 4 * 16 + 4, "q_norm", "4 channels", conv_bias("q", 4)),
            "k": Group(4, 4 * 16 + 4, "k_norm", "4 channels", conv_bias("k", 4)),
        },
        {
            "embed": "used besides",
            "v": "reaches out (Linear: Addmm), whose bias no normalization of each channel cancels",
            "out": "before any normalization",
            "fc1": "Gelu",
            "fc2": "before any normalization",
            "head": "reaches the model's output",
        },
    ),
    "bn-mlp": (
        bn_mlp,
        IMAGES,
        {
            "fc1": Group(32, 192, "bn1", "channel", conv("fc1", 32)),
            "fc2": Group(32, 32, "bn2", "channel", conv("fc2", 32)),
        },
        {"fc3": "reaches the model's output"},
    ),
    "ln-mlp": (
        ln_mlp,
        IMAGES,
        {"fc1": Group(1, 32 * 192 + 32, "ln1", "layer", conv_bias("fc1", 1))},
        {"fc2": "reaches the model's output"},
    ),
    "weight-norm": (
        weight_normed_mlp,
        IMAGES,
        {
            "fc1": Group(32, 192, "", "channel", rows("fc1.parametrizations.weight.original1", 32)),
            "fc2": Group(10, 32, "", "channel", rows("fc2.parametrizations.weight.original1", 10)),
        },
        {},
    ),
    "control-flow": (
        Adaptive,
        IMAGES,
        {
            "stem.0": Group(8, 27, "stem.1", "channel", conv("stem.0", 8)),
            "block.0": Group(8, 72, "block.1", "channel", conv("block.0", 8)),
            "left.0": Group(4, 8, "left.1", "channel", conv("left.0", 4)),
        },
        {"fc": "reaches the model's output"},
    ),
    "negatives": (
        Negatives,
        IMAGES,
        {},
        {"gelu_conv": "Gelu", "residual_conv": "used besides", "fc": "reaches the model's output"},
    ),
}
