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
