"""Real model definitions nobody here wrote, built from code with random weights (no download).

torchvision, timm and Hugging Face ``transformers`` (the ``zoo`` extra): each entry builds the model and
an example input small enough for two CPU cores, and names its attention head size if it has heads.
Images are 64×64 for the ImageNet-style networks that downsample 32-fold (2×2 at the last stage: a
BatchNorm over a 1×1 map of a batch of 2 sees two values, which makes nearly anything upstream invariant);
token sequences are 8 long.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tests.torchvision_ops import define_torchvision_op_schemas


@dataclass(frozen=True)
class RealModel:
    library: str  # the package that defines it: "torchvision", "timm" or "transformers"
    build: Callable[[], nn.Module]
    example: Callable[[torch.Generator], Any]
    head_dim: int | None = None


def image(size: int, batch: int = 2) -> Callable[[torch.Generator], torch.Tensor]:
    return lambda gen: torch.randn(batch, 3, size, size, generator=gen)


def tokens(vocab: int = 128, length: int = 8, batch: int = 2) -> Callable[[torch.Generator], dict[str, torch.Tensor]]:
    return lambda gen: {"input_ids": torch.randint(0, vocab, (batch, length), generator=gen)}


def _tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        define_torchvision_op_schemas()
        import torchvision

        return torchvision.models.get_model(name, weights=None, **kwargs)

    return build


def _tv_class(path: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        define_torchvision_op_schemas()
        import torchvision.models as tvm

        module, cls = path.rsplit(".", 1)
        return getattr(getattr(tvm, module), cls)(**kwargs)

    return build


def _tv_convnext() -> nn.Module:
    define_torchvision_op_schemas()
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    settings = [CNBlockConfig(16, 32, 2), CNBlockConfig(32, 64, 2), CNBlockConfig(64, None, 2)]
    return ConvNeXt(settings, num_classes=10)


def _tv_swin() -> nn.Module:
    define_torchvision_op_schemas()
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=10
    )


def _tv_swin_v2() -> nn.Module:
    """torchvision's Swin V2: cosine attention, q/k/v and the output projection by ``F.linear`` on the modules'
    weights, the key bias zeroed in place, post-norms. Its continuous position bias MLP gets PyTorch's default
    Linear initialization instead of std 0.02: at 0.02 it moves the output by 1e-5, too little for the ground
    truth to tell it apart from an invariant layer."""
    define_torchvision_op_schemas()
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    model = SwinTransformer(
        patch_size=[2, 2],
        embed_dim=32,
        depths=[2, 2],
        num_heads=[4, 8],
        window_size=[4, 4],
        num_classes=10,
        block=SwinTransformerBlockV2,
        downsample_layer=PatchMergingV2,
    )
    for module in model.modules():
        if hasattr(module, "cpb_mlp"):
            for layer in module.cpb_mlp:
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()
    return model


def _tv_vgg11_bn() -> nn.Module:
    model = _tv("vgg11_bn")()
    # Its 120M-parameter classifier (no normalization) replaced by one Linear: 20x less to copy and scale.
    model.classifier = nn.Linear(512 * 7 * 7, 10)
    return model


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        define_torchvision_op_schemas()
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)

    return build


def _timm_bit() -> nn.Module:
    """timm's ResNetV2-50x1 BiT (weight-standardized convs, GroupNorm), one block per stage."""
    define_torchvision_op_schemas()
    from functools import partial

    from timm.layers import GroupNormAct, StdConv2d
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(
        layers=(1, 1, 1, 1),
        num_classes=10,
        stem_type="fixed",
        conv_layer=partial(StdConv2d, eps=1e-8),
        norm_layer=partial(GroupNormAct, num_groups=32),
    )


def _hf(config: str, model: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        define_torchvision_op_schemas()
        import transformers

        cfg = getattr(transformers, config)(**kwargs)
        return getattr(transformers, model)(cfg)

    return build


_LLM = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    # 10x the default 0.02: attention logits of 1e-3 make q and k nearly invariant to anything (a scaled
    # q_proj would move the output by 2e-5), and 1e-6 eps would dominate the variance of 2e-3 activations.
    "initializer_range": 0.2,
}
_ENCODER = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "initializer_range": 0.2,
}

MODELS: dict[str, RealModel] = {
    # torchvision
    "tv_resnet50": RealModel("torchvision", _tv("resnet50"), image(64)),
    "tv_resnext50_32x4d": RealModel("torchvision", _tv("resnext50_32x4d"), image(64)),
    "tv_mobilenet_v3_small": RealModel("torchvision", _tv("mobilenet_v3_small"), image(64)),
    "tv_efficientnet_b0": RealModel("torchvision", _tv("efficientnet_b0"), image(64)),
    "tv_convnext": RealModel("torchvision", _tv_convnext, image(32)),
    "tv_regnet_y_400mf": RealModel("torchvision", _tv("regnet_y_400mf"), image(64)),
    "tv_densenet121": RealModel("torchvision", _tv("densenet121"), image(64)),
    "tv_vgg11_bn": RealModel("torchvision", _tv_vgg11_bn, image(32)),
    "tv_shufflenet_v2": RealModel("torchvision", _tv("shufflenet_v2_x0_5"), image(64)),
    "tv_mnasnet": RealModel("torchvision", _tv("mnasnet0_5"), image(64)),
    "tv_vit": RealModel(
        "torchvision",
        _tv_class(
            "vision_transformer.VisionTransformer",
            image_size=32,
            patch_size=8,
            num_layers=2,
            num_heads=2,
            hidden_dim=32,
            mlp_dim=64,
            num_classes=10,
        ),
        image(32),
    ),
    "tv_swin": RealModel("torchvision", _tv_swin, image(32)),
    "tv_swin_v2": RealModel("torchvision", _tv_swin_v2, image(32), head_dim=8),  # issue 25
    "tv_lraspp_mobilenet_v3": RealModel(
        "torchvision", _tv("lraspp_mobilenet_v3_large", weights_backbone=None, num_classes=3), image(64)
    ),
    # timm
    "timm_resnet50d": RealModel("timm", _timm("resnet50d"), image(64)),
    "timm_test_resnet": RealModel("timm", _timm("test_resnet"), image(32)),
    "timm_convnext_ln2d": RealModel("timm", _timm("test_convnext", conv_mlp=True), image(32)),
    "timm_nfnet": RealModel("timm", _timm("test_nfnet"), image(32)),
    "timm_resnetv2_stdconv": RealModel("timm", _timm_bit, image(64)),
    "timm_efficientnet": RealModel("timm", _timm("test_efficientnet"), image(32)),
    "timm_byobnet": RealModel("timm", _timm("test_byobnet"), image(32)),
    "timm_efficientnet_gn": RealModel("timm", _timm("test_efficientnet_gn"), image(32)),
    # issue 25: star blocks `act(f1(x)) * f2(x) → conv(bias) → BN`, the bias on the way cancelled by the BN
    "timm_starnet": RealModel("timm", _timm("starnet_s050", num_classes=10), image(64)),
    # issue 25: `F.linear(x, self.qkv.weight, cat(q_bias, k_bias, v_bias))`, per-head norms on q and k, a norm in
    # the SwiGLU MLP
    "timm_eva02": RealModel(
        "timm",
        _timm(
            "eva02_tiny_patch14_224",
            img_size=28,
            embed_dim=32,
            depth=2,
            num_heads=4,
            num_classes=10,
            qk_norm=True,
            scale_mlp=True,
        ),
        image(28),
        head_dim=8,
    ),
    # issue 25: ReLU linear attention (LiteMLA), its denominator from padding v with ones
    "timm_efficientvit": RealModel("timm", _timm("efficientvit_b0", num_classes=10), image(64), head_dim=16),
    "timm_vit_qk_norm": RealModel(
        "timm",
        _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, qk_norm=True),
        image(32),
        head_dim=8,
    ),
    # Hugging Face transformers
    "hf_llama": RealModel("transformers", _hf("LlamaConfig", "LlamaForCausalLM", **_LLM), tokens(), head_dim=8),
    "hf_qwen3": RealModel(
        "transformers", _hf("Qwen3Config", "Qwen3ForCausalLM", head_dim=8, **_LLM), tokens(), head_dim=8
    ),
    "hf_olmo2": RealModel("transformers", _hf("Olmo2Config", "Olmo2ForCausalLM", **_LLM), tokens(), head_dim=8),
    "hf_gemma3": RealModel(
        "transformers", _hf("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=8, **_LLM), tokens(), head_dim=8
    ),
    "hf_bert": RealModel(
        "transformers", _hf("BertConfig", "BertModel", vocab_size=128, **_ENCODER), tokens(), head_dim=8
    ),
    # issue 25: DeBERTa-v3's configuration: token embeddings straight into a LayerNorm (no position embedding
    # added), relative position embeddings normalized row by row
    "hf_deberta_v2": RealModel(
        "transformers",
        _hf(
            "DebertaV2Config",
            "DebertaV2Model",
            vocab_size=128,
            position_biased_input=False,
            relative_attention=True,
            pos_att_type="p2c|c2p",
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            position_buckets=16,
            max_relative_positions=-1,
            **_ENCODER,
        ),
        tokens(),
        head_dim=8,
    ),
    "hf_vit": RealModel(
        "transformers",
        _hf("ViTConfig", "ViTModel", image_size=32, patch_size=8, **_ENCODER),
        lambda gen: {"pixel_values": torch.randn(2, 3, 32, 32, generator=gen)},
        head_dim=8,
    ),
    "hf_convnext": RealModel(
        "transformers",
        _hf(
            "ConvNextConfig", "ConvNextModel", hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, initializer_range=0.2
        ),
        lambda gen: {"pixel_values": torch.randn(2, 3, 32, 32, generator=gen)},
    ),
}

#: Run by default (each well under 10 s); the others are ``slow``.
FAST = ("timm_test_resnet", "timm_vit_qk_norm", "hf_qwen3", "tv_swin_v2", "hf_deberta_v2")


def available(library: str) -> bool:
    return importlib.util.find_spec(library) is not None


def build(name: str, seed: int = 0) -> tuple[nn.Module, Any]:
    """The model (random weights, seeded) and its example input."""
    entry = MODELS[name]
    torch.manual_seed(seed)
    model = entry.build()
    return model, entry.example(torch.Generator().manual_seed(seed + 1))


@dataclass
class Comparison:
    """Detection against the ground truth on one model (module names throughout)."""

    model: str
    invariant_real: list[str]  # invariant with the model's own eps on the example input
    invariant_tiny: list[str]  # invariant with every eps tiny (structurally)
    detected: list[str]
    false_negatives: dict[str, str]  # invariant with real eps, not detected → the package's reason
    false_positives: dict[str, float]  # detected, but scaling its groups moves the output (eps tiny)
    wrong_granularity: dict[str, str]  # detected with coarser groups than the finest invariant ones
    seconds: float  # detection time
    built_detected: list[str]  # detected on the model as built (zero-initialized parameters left at zero)
    built_false_positives: dict[str, float]
    gap: tuple[float, float]  # ground truth: largest change of an invariant test, smallest of a failed one

    @property
    def recall(self) -> float:
        return 1 - len(self.false_negatives) / max(len(self.invariant_real), 1)


def _granularity(truth: Any, channels: int) -> str:
    if truth.heads:
        return f"heads {list(truth.heads)}"
    return "channel" if truth.block == 1 else "layer" if truth.block == channels else f"{truth.block} channels"


def compare(name: str) -> Comparison:
    """Run detection on model ``name`` as built and with its zero-initialized parameters randomized, and
    check both against the ground truth of the randomized model."""
    import time
    import warnings

    define_torchvision_op_schemas()  # before lightning_sphere imports Lightning, which imports torchvision
    from lightning_sphere import find_invariant_groups
    from tests import ground_truth as gt

    entry = MODELS[name]
    model, example = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = find_invariant_groups(model, example)
        built_changes = gt.claim_change(model, example, built)
        gt.randomize_zero_parameters(model)
        start = time.perf_counter()
        found = find_invariant_groups(model, example)
        seconds = time.perf_counter() - start
        truth = gt.ground_truth(model, example, entry.head_dim)
        changes = gt.claim_change(model, example, found)
    real, tiny = truth.invariant(real_eps=True), truth.invariant(real_eps=False)
    detected = {g.module_name: g for g in found}
    layers = gt.layers(model)
    wrong = {}
    for module, g in detected.items():
        verdict = truth.verdicts.get(module)
        channels = gt.out_channels(layers[module]) if module in layers else 0
        if verdict is not None and verdict.block is not None and g.num_groups < channels // verdict.block:
            wrong[module] = f"{g.granularity} ({g.num_groups} groups), truth: {_granularity(verdict, channels)}"
    return Comparison(
        model=name,
        invariant_real=list(real),
        invariant_tiny=list(tiny),
        detected=list(detected),
        false_negatives={m: found.rejected.get(m, "neither tracked nor listed") for m in real if m not in detected},
        false_positives={m: c for m, c in changes.items() if c > gt.STRUCTURAL_TOLERANCE},
        wrong_granularity=wrong,
        seconds=seconds,
        built_detected=[g.module_name for g in built],
        built_false_positives={m: c for m, c in built_changes.items() if c > gt.STRUCTURAL_TOLERANCE},
        gap=truth.gap,
    )
