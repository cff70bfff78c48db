"""What each autograd operation does to a scale: the walk's operator tables, as data.

A layer's output channels scaled by ρ_c > 0 scale every value downstream in a way fixed by the operation that
made it; :mod:`lightning_sphere.detection.walk` interprets these tables. Names are autograd node names
(``torch.autograd.graph.Node.name()``).
"""

from __future__ import annotations

from fractions import Fraction

#: Element-wise operations positively homogeneous of any degree, f(ρx) = ρ f(x) for ρ > 0, that commute
#: with adding a per-channel constant (so that a centering normalization still cancels the layer's bias).
_ELEMENTWISE_SHIFT_COMMUTING = frozenset({"AliasBackward0", "CloneBackward0", "ToCopyBackward0"})


#: Positively homogeneous element-wise operations that do not commute with a shift: after them the bias
#: is no longer cancelled, and it joins its channel's group.
_ELEMENTWISE_SHIFT_BREAKING = frozenset(
    {"ReluBackward0", "LeakyReluBackward0", "NativeDropoutBackward0", "AbsBackward0", "NegBackward0"}
)


#: Views: they only move entries (the output shape comes from the node's metadata).
_RESHAPES = frozenset(
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
_SPATIAL = frozenset(
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
_REDUCTIONS = frozenset(
    {"MeanBackward0", "MeanBackward1", "SumBackward0", "SumBackward1", "AmaxBackward0", "MaxBackward0"}
)


#: Statistics of a scale: (degree multiplier, reduces).
_STATISTICS = {
    "VarBackward0": (2, True),
    "StdBackward0": (1, True),
    "LinalgVectorNormBackward0": (1, True),
    "NormBackward1": (1, True),
    "SqrtBackward0": (Fraction(1, 2), False),
    "RsqrtBackward0": (Fraction(-1, 2), False),
    "ReciprocalBackward0": (-1, False),
}


_BATCH_NORMS = frozenset({"NativeBatchNormBackward0", "CudnnBatchNormBackward0", "MiopenBatchNormBackward0"})


#: Operations after which channel c of the tensor is still output channel c of the layer.
_CHANNEL_KEEPING = (
    _ELEMENTWISE_SHIFT_COMMUTING
    | _ELEMENTWISE_SHIFT_BREAKING
    | _SPATIAL
    | {"MulBackward0", "MulBackward1", "DivBackward0", "DivBackward1"}
)


#: Most operations followed from one layer before giving up.
_MAX_STEPS = 20_000
