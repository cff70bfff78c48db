"""What each autograd operation does to a scale: the scaling walk's operator table, as data.

A layer's output channels scaled by ρ_c > 0 scale every value downstream in a way fixed by the operation that
made it. :data:`RULES` maps each autograd node name (``torch.autograd.graph.Node.name()``) the walk understands
to its :data:`~lightning_sphere.detection.scaling.Rule`; :mod:`lightning_sphere.detection.walk` interprets the
graph with it, and any operation not in the table breaks the scale (the layer is rejected, naming the operation).
The rules themselves are grouped by family: :mod:`.elementwise`, :mod:`.views`, :mod:`.reductions`,
:mod:`.normalizations`, :mod:`.contractions`.

To teach the walk a new operation: add its node name here, to the set of its kind or with its own rule; a new
kind of operation gets a rule in its family's module (a function ``(walk, node, inputs) -> outputs``, see
:class:`~lightning_sphere.detection.scaling.WalkContext` for what it may use of the walk).
"""

from __future__ import annotations

from fractions import Fraction
from functools import partial

from lightning_sphere.detection.operations import contractions, elementwise, normalizations, reductions, views
from lightning_sphere.detection.scaling import Rule

#: Element-wise operations positively homogeneous of any degree, f(ρx) = ρ f(x) for ρ > 0, that commute
#: with adding a per-channel constant (so that a centering normalization still cancels the layer's bias).
ELEMENTWISE_SHIFT_COMMUTING = frozenset({"AliasBackward0", "CloneBackward0", "ToCopyBackward0"})


#: Positively homogeneous element-wise operations that do not commute with a shift: after them the bias
#: is no longer cancelled, and it joins its channel's group.
ELEMENTWISE_SHIFT_BREAKING = frozenset(
    {"ReluBackward0", "LeakyReluBackward0", "NativeDropoutBackward0", "AbsBackward0", "NegBackward0"}
)


#: Views: they only move entries (the output shape comes from the node's metadata).
RESHAPES = frozenset(
    {
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "SqueezeBackward2",
        "UnsqueezeBackward0",
    }
)


#: Spatial operations that keep channels apart (dims 0 and 1 of an ``(N, C, *)`` tensor).
SPATIAL = frozenset(
    {
        "MaxPool1DWithIndicesBackward0",
        "MaxPool2DWithIndicesBackward0",
        "MaxPool3DWithIndicesBackward0",
        "AvgPool2DBackward0",
        "AvgPool3DBackward0",
        "AdaptiveAvgPool2DBackward0",
        "AdaptiveAvgPool3DBackward0",
        "AdaptiveMaxPool2DBackward0",
        "AdaptiveMaxPool3DBackward0",
        "UpsampleNearest1DBackward0",
        "UpsampleNearest2DBackward0",
        "UpsampleNearest3DBackward0",
        "UpsampleBilinear2DBackward0",
    }
)


#: Reductions homogeneous of degree 1 (sum, mean, max over some dimensions).
REDUCTIONS = frozenset(
    {"MeanBackward0", "MeanBackward1", "SumBackward0", "SumBackward1", "AmaxBackward0", "MaxBackward0"}
)


#: Statistics of a scale: (degree multiplier, reduces).
STATISTICS: dict[str, tuple[Fraction | int, bool]] = {
    "VarBackward0": (2, True),
    "StdBackward0": (1, True),
    "LinalgVectorNormBackward0": (1, True),
    "NormBackward1": (1, True),
    "SqrtBackward0": (Fraction(1, 2), False),
    "RsqrtBackward0": (Fraction(-1, 2), False),
    "ReciprocalBackward0": (-1, False),
}


BATCH_NORMS = frozenset({"NativeBatchNormBackward0", "CudnnBatchNormBackward0", "MiopenBatchNormBackward0"})


#: Autograd node name → what the operation does to a scale.
RULES: dict[str, Rule] = {
    **dict.fromkeys(ELEMENTWISE_SHIFT_COMMUTING, elementwise.shift_commuting),
    **dict.fromkeys(ELEMENTWISE_SHIFT_BREAKING, elementwise.shift_breaking),
    "PreluKernelBackward0": elementwise.shift_breaking,  # as a relu, in its input (input 0) alone: not its weight
    "ClampMinBackward0": elementwise.clamp_min,
    **dict.fromkeys(("AddBackward0", "SubBackward0", "AddBackward1", "SubBackward1", "RsubBackward1"), elementwise.add),
    **dict.fromkeys(("MulBackward0", "MulBackward1"), elementwise.product),
    **dict.fromkeys(("DivBackward0", "DivBackward1"), elementwise.quotient),
    "PowBackward0": elementwise.power,
    **dict.fromkeys(RESHAPES | {"ExpandBackward0"}, views.reshape),
    "PermuteBackward0": views.permute,
    "TransposeBackward0": views.transpose,
    "TBackward0": views.t,
    "SliceBackward0": views.slice_,
    "RollBackward0": views.roll,
    "ConstantPadNdBackward0": views.constant_pad,
    "SelectBackward0": views.select,
    **dict.fromkeys(("SplitBackward0", "SplitWithSizesBackward0", "UnbindBackward0"), views.split),
    "CatBackward0": views.cat,
    **dict.fromkeys(SPATIAL, reductions.pooling),
    **dict.fromkeys(REDUCTIONS, reductions.reduction),
    **{
        op: partial(reductions.statistic, factor=factor, reduces=reduces)
        for op, (factor, reduces) in STATISTICS.items()
    },
    "VarMeanBackward0": partial(reductions.statistic_and_mean, factor=2),
    "StdMeanBackward0": partial(reductions.statistic_and_mean, factor=1),
    "MmBackward0": contractions.matmul,
    "AddmmBackward0": contractions.addmm,
    "BmmBackward0": contractions.matmul,
    "ConvolutionBackward0": contractions.convolution,
    "EmbeddingBackward0": contractions.embedding,
    "NativeLayerNormBackward0": normalizations.layer_norm,
    "NativeGroupNormBackward0": normalizations.group_norm,
    **dict.fromkeys(BATCH_NORMS, normalizations.batch_norm),
}


#: Rules for families of node names that differ by backend: name prefix → rule (after :data:`RULES`).
PREFIX_RULES: dict[str, Rule] = {
    "ScaledDotProduct": contractions.attention,  # one node name per fused attention kernel (flash, efficient, ...)
}


def rule_for(op: str) -> Rule | None:
    """The rule of the autograd node named ``op``; ``None``: the walk does not follow it."""
    rule = RULES.get(op)
    if rule is None:
        rule = next((r for prefix, r in PREFIX_RULES.items() if op.startswith(prefix)), None)
    return rule
