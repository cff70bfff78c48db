"""Detection on real model definitions (torchvision, timm, transformers) against the functional ground truth.

Zero false positives is asserted: a group the package tracks must leave the output unchanged when scaled
(:mod:`tests.ground_truth`), on the model as built and with its zero-initialized parameters randomized.
Recall is reported, not asserted (``benchmarks/detection_table.py`` prints the table). Needs the ``zoo``
extra; each test skips when its library is missing. The models in ``FAST`` run by default, the rest
with ``pytest -m slow``.
"""

import pytest

from tests.real_models import FAST, MODELS, compare


def _cases():
    for name, entry in MODELS.items():
        yield pytest.param(name, entry.library, id=name, marks=() if name in FAST else pytest.mark.slow)


@pytest.mark.parametrize(("name", "library"), list(_cases()))
def test_every_detected_group_is_invariant(name, library, record_property):
    pytest.importorskip(library)
    result = compare(name)
    record_property("recall", result.recall)
    print(
        f"{name}: {len(result.detected)} detected, recall {result.recall:.0%} of {len(result.invariant_real)}; "
        f"missed: {result.false_negatives}"
    )
    assert result.false_positives == {}
    assert result.built_false_positives == {}
    # The ground truth separates its verdicts by orders of magnitude on every model, or it proves nothing.
    invariant_max, failed_min = result.gap
    assert invariant_max < 1e-6 < 1e-4 < failed_min


def test_a_bias_a_batch_norm_cancels_leaves_the_layer_before_it_tracked():
    """timm's StarNet: ``act(f1(x)) * f2(x) → g.conv(bias) → g.bn``: f2 is invariant (the ground truth, eps tiny) and
    was given up as "a bias on the way"; the batch norm cancels g's bias, so f2 is detected (issue 25, kind 3)."""
    pytest.importorskip("timm")
    result = compare("timm_starnet")
    f2 = {name for name in result.invariant_tiny if name.endswith(".f2.conv")}
    detected_f2 = f2 & set(result.detected)
    assert detected_f2 and detected_f2 <= set(result.invariant_tiny)  # found, and truly invariant
    assert result.false_positives == {} and result.built_false_positives == {}


def test_one_entry_groups_of_a_real_model_are_listed_with_the_true_reason():
    """timm's FastViT scales each channel by a depthwise ``[C, 1, 1, 1]`` conv before a BatchNorm (``conv_scale``):
    it was rejected as "invariant only up to the eps" (|cos(g, x)| reads 1 in one dimension, at any eps); now the
    reason says what it is (issue 25, kind 2; the ground truth of such a layer: tests/test_dataflow_norms.py)."""
    pytest.importorskip("timm")
    import warnings

    import torch

    from lightning_sphere import find_invariant_groups
    from tests.torchvision_ops import define_torchvision_op_schemas

    define_torchvision_op_schemas()
    import timm

    torch.manual_seed(0)
    model = timm.create_model("fastvit_t8", pretrained=False, num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = find_invariant_groups(model, torch.randn(2, 3, 64, 64))
    scales = {name: why for name, why in groups.rejected.items() if name.endswith("conv_scale.conv")}
    assert len(scales) >= 10 and all(why.startswith("one entry per group (d = 1") for why in scales.values())


# --- issue 25: weights used outside their module (kind 1), hand-written normalizations (4), embedding rows (5) ---


def _found(model, example):
    import warnings

    import torch

    from lightning_sphere import find_invariant_groups

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return find_invariant_groups(model, example)


def test_swin_v2_projections_used_by_f_linear_are_followed_from_their_weights():
    """torchvision's Swin V2 calls ``F.linear(x, self.qkv.weight, bias)`` (the key bias zeroed in place) and never
    the ``Linear``: the q and k rows of every head (cosine attention) and the post-normed ``proj`` were "not called
    yet"; now they are tracked, and the ground truth finds exactly those heads invariant (kind 1, and kind 4's
    cosine attention)."""
    pytest.importorskip("torchvision")
    from tests import ground_truth as gt
    from tests.real_models import build

    result = compare("tv_swin_v2")
    assert result.false_negatives == {} and result.false_positives == {} and result.built_false_positives == {}
    model, example = build("tv_swin_v2")
    gt.randomize_zero_parameters(model)
    truth = gt.ground_truth(model, example, head_dim=8)
    found = {g.module_name: g for g in _found(model, example)}
    for name, verdict in truth.verdicts.items():
        if name.endswith("attn.qkv"):
            width = model.get_submodule(name).out_features // 3
            assert verdict.heads == tuple(range(2 * width // 8))  # the q and k heads, not v
            weight, bias = found[name].slices
            rows = 8 * (model.get_submodule(name).in_features + 1)  # a head's rows, weight and bias
            assert (weight.channels, bias.channels, found[name].group_size) == ((0, 2 * width), (0, 2 * width), rows)
        if name.endswith("attn.proj"):
            assert found[name].granularity == "layer" and verdict.block == model.get_submodule(name).out_features


def test_eva_qkv_rows_join_the_q_bias_the_attention_concatenates():
    """timm's EVA: ``F.linear(x, self.qkv.weight, cat(q_bias, k_bias, v_bias))``: the q rows of each head are
    tracked with the entries of ``q_bias`` added to them (a parameter of the attention, not of the Linear)."""
    pytest.importorskip("timm")
    result = compare("timm_eva02")
    assert result.false_positives == {} and result.built_false_positives == {}
    from tests.real_models import build

    model, example = build("timm_eva02")
    found = {g.module_name: g for g in _found(model, example)}
    weight, bias = found["blocks.0.attn.qkv"].slices
    assert (weight.name, weight.channels, bias.name, bias.channels) == (
        "blocks.0.attn.qkv.weight",
        (0, 32),
        "blocks.0.attn.q_bias",
        None,
    )
    assert found["blocks.0.attn.qkv"].num_groups == 4  # one per head


def test_timm_linear_attention_is_recognized_as_a_normalization():
    """timm's EfficientViT ``LiteMLA`` divides ``q·(kᵀ v)`` by ``q·Σk + eps`` (v padded with ones): the q and k rows
    of each head of its qkv conv and of its multi-scale convs are invariant, and the BatchNorm after the output
    projection makes qkv invariant as a whole (kind 4); every detected group is invariant (the ground truth)."""
    pytest.importorskip("timm")
    import torch

    from tests import ground_truth as gt
    from tests.torchvision_ops import define_torchvision_op_schemas

    define_torchvision_op_schemas()
    from timm.models.efficientvit_mit import LiteMLA

    torch.manual_seed(0)
    model = LiteMLA(32, 32, dim=8)
    example = torch.randn(2, 32, 6, 6)
    found = _found(model, example)
    truth = gt.ground_truth(model, example, head_dim=8)
    assert all(change <= gt.STRUCTURAL_TOLERANCE for change in gt.claim_change(model, example, found).values())
    names = {g.module_name: g for g in found}
    assert set(names) == {n for n, v in truth.verdicts.items() if v.structural}
    assert names["qkv.conv"].granularity == "layer" and truth.verdicts["qkv.conv"].block == 96
    assert names["aggreg.0.0"].num_groups == 2 * 4  # q and k of each of the 4 heads
    assert truth.verdicts["aggreg.0.0"].heads == (0, 1, 3, 4, 6, 7, 9, 10)  # the same blocks of 8 rows


def test_deberta_embedding_rows_are_groups():
    """DeBERTa-v3's token embeddings feed a LayerNorm directly, and its relative position embeddings are read by
    ``.weight`` and normalized row by row: each row is a group (kind 5), as the ground truth finds."""
    pytest.importorskip("transformers")
    result = compare("hf_deberta_v2")
    assert result.false_negatives == {} and result.false_positives == {}
    assert {"embeddings.word_embeddings", "encoder.rel_embeddings"} <= set(result.detected)
    from tests.real_models import build

    model, example = build("hf_deberta_v2")
    found = {g.module_name: g for g in _found(model, example)}
    assert found["embeddings.word_embeddings"].num_groups == 128 and found["encoder.rel_embeddings"].group_size == 32
