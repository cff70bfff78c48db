"""Which layers of a model are radially invariant, found by scaling them: a functional ground truth.

Independent of the package's detection: no graph, no gradient, no knowledge of normalization classes. A
group of a layer's weights (with the matching bias entries) is invariant iff multiplying it by ρ > 0 leaves
the model's output unchanged. Each layer is scaled in a float64 copy of the model, with every
normalization in training mode (batch statistics, as during training), dropout and stochastic depth off,
and the output compared with the unscaled one.

Tolerances. A scaled invariant group changes the output only by round-off, and by eps: a norm computes
``x / sqrt(var + eps)``, so scaling x by ρ moves the output by about ``eps (1 - ρ⁻²) / (2 var)``.
``TINY_EPS`` sets every eps to 1e-30 (not 0, so that constant channels stay finite): then only round-off
is left, ~1e-15 in float64 but ~1e-7 where a model casts to float32 inside its norm (Hugging Face's
RMSNorm classes do), hence ``STRUCTURAL_TOLERANCE = 1e-5``; a non-invariant layer scaled by 2 moves the
output by 1e-3…1 on these models (:func:`report` returns both extremes, the table prints them). With the
model's real eps, ``REAL_EPS_TOLERANCE = 1e-3`` separates "invariant up to eps" from layers whose
normalization is dominated by eps on this input (torchvision's MobileNetV3/EfficientNet depthwise convs
with ``BatchNorm2d(eps=1e-3)`` move the output by 1–3 %).

Groups tried per layer, finest first, each with the layer's bias scaled alike and then without it (weight
standardization makes the weight alone invariant, not its bias): each output channel (random factors in
[0.5, 2] for every channel at once), each run of ``k`` channels for ``k`` a head size or a GroupNorm's
channels per group, the whole layer (ρ = 2 and 0.5). A fused projection whose output is several heads'
worth of q, k and v (timm's ``qkv``) is then tried head by head, each alone.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

TINY_EPS = 1e-30
STRUCTURAL_TOLERANCE = 1e-5
REAL_EPS_TOLERANCE = 1e-3
#: Attributes that hold a normalization's eps (torch and timm: ``eps``; Hugging Face: ``variance_epsilon``).
EPS_ATTRIBUTES = ("eps", "variance_epsilon", "epsilon")
#: Modules that are the identity with ``training=False``: dropout and stochastic depth of torch, timm, torchvision.
_RANDOM_CLASSES = ("Dropout", "DropPath", "StochasticDepth", "DropBlock")
_DRAWS = 2  # random per-group factor draws, besides ρ = 2 and 0.5


#: Parameters whose entries are all below this in magnitude count as zero-initialized: ConvNeXt's layer
#: scale starts at 1e-6, which hides its whole residual branch below any output tolerance.
VANISHING = 1e-4


def randomize_zero_parameters(model: nn.Module, seed: int = 0) -> list[str]:
    """Give every all-zero (or all below :data:`VANISHING`) parameter random values: zero-initialized residual
    branches, layer scales, heads and biases make scaling tests and gradients meaningless. Returns their names."""
    gen = torch.Generator().manual_seed(seed)
    names = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() and p.abs().max() < VANISHING:
                scale = 1 / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.1
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
                names.append(name)
    return names


def functional_copy(model: nn.Module, eps: float | None) -> nn.Module:
    """A float64 copy with norms in training mode, dropout off and, unless ``eps`` is None, every eps set."""
    twin = copy.deepcopy(model).double().train()
    for module in twin.modules():
        if any(k in type(module).__name__ for k in _RANDOM_CLASSES):
            module.eval()
        if eps is not None:
            for attr in EPS_ATTRIBUTES:
                if isinstance(getattr(module, attr, None), float):
                    setattr(module, attr, eps)
    return twin


def tensors(value: Any) -> Iterator[Tensor]:
    """Every floating tensor in a nested structure of tuples, lists and dicts (model outputs)."""
    if isinstance(value, Tensor):
        if value.is_floating_point():
            yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from tensors(item)
    elif isinstance(value, tuple | list):
        for item in value:
            yield from tensors(item)


def call(model: nn.Module, example: Any) -> Any:
    if isinstance(example, Mapping):
        return model(**example)
    if isinstance(example, tuple | list):
        return model(*example)
    return model(example)


def as_double(example: Any) -> Any:
    if isinstance(example, Tensor):
        return example.double() if example.is_floating_point() else example
    if isinstance(example, Mapping):
        return {k: as_double(v) for k, v in example.items()}
    if isinstance(example, tuple | list):
        return type(example)(as_double(v) for v in example)
    return example


class Probe:
    """A float64 model and its reference output on one input: how far a change of weights moves it."""

    def __init__(self, model: nn.Module, example: Any) -> None:
        self.model, self.example = model, as_double(example)
        self.reference = self._output()
        self.scale = max((t.abs().max().item() for t in self.reference if t.numel()), default=1.0) or 1.0

    @torch.no_grad()
    def _output(self) -> list[Tensor]:
        torch.manual_seed(0)  # models that draw random numbers in training mode draw the same ones
        return list(tensors(call(self.model, self.example)))

    @torch.no_grad()
    def change(self, scalings: Sequence[tuple[Tensor, Callable[[Tensor], Tensor]]]) -> float:
        """Largest |Δoutput| / max|output| once each ``(tensor, f)`` is replaced by ``f(tensor)``."""
        saved = [t.clone() for t, _ in scalings]
        for t, f in scalings:
            t.copy_(f(t))
        try:
            out = self._output()
        finally:
            for (t, _), s in zip(scalings, saved, strict=True):
                t.copy_(s)
        if len(out) != len(self.reference) or any(a.shape != b.shape for a, b in zip(out, self.reference, strict=True)):
            return math.inf
        pairs = zip(out, self.reference, strict=True)
        diff = max((float((a - b).abs().max()) for a, b in pairs if a.numel()), default=0)
        return math.inf if not math.isfinite(diff) else diff / self.scale


def out_channels(layer: nn.Module) -> int:
    """Output channels of a layer; an embedding's rows."""
    if isinstance(layer, nn.Embedding):
        return layer.num_embeddings
    return layer.out_channels if isinstance(layer, _ConvNd) else layer.out_features


def scale_layer(
    layer: nn.Module, factors: Tensor, with_bias: bool = True
) -> list[tuple[Tensor, Callable[[Tensor], Tensor]]]:
    """Multiply output channel c of ``layer`` (the weight, and the bias if ``with_bias``) by ``factors[c]``."""
    if isinstance(layer, _ConvTransposeNd):
        # (C_in, C_out / groups, *k): output channel (g, j) is dim 1 of group g's block of dim 0.
        g = layer.groups
        shape = (g, 1, -1) + (1,) * (layer.weight.dim() - 2)

        def scale_weight(w: Tensor) -> Tensor:
            return (w.unflatten(0, (g, -1)) * factors.view(shape)).flatten(0, 1)
    else:

        def scale_weight(w: Tensor) -> Tensor:
            return w * factors.view((-1,) + (1,) * (w.dim() - 1))

    scalings = [(layer.weight, scale_weight)]
    if with_bias and getattr(layer, "bias", None) is not None:
        scalings.append((layer.bias, lambda b: b * factors))
    return scalings


@dataclass
class Verdict:
    """The finest invariant grouping of one layer's output channels, by block size (1: per channel; the
    channel count: whole layer), or ``heads``: the head blocks invariant alone (fused projections)."""

    block: int | None
    change: float  # output change of the test that decided (the worst invariant one, or the first failure)
    real_eps: bool = False  # still invariant with the model's own eps
    real_change: float = math.nan
    heads: tuple[int, ...] = ()
    with_bias: bool = True  # the bias scaled with the weight (False: the weight alone, weight standardization)

    @property
    def structural(self) -> bool:
        return self.block is not None or bool(self.heads)


def _factor_sets(channels: int, block: int, gen: torch.Generator) -> list[Tensor]:
    """Random factors in [0.5, 2], one per block of ``block`` channels (several draws), then ρ = 2 and 0.5."""
    blocks = channels // block
    draws = [
        torch.exp((torch.rand(blocks, generator=gen, dtype=torch.float64) * 2 - 1) * math.log(2)).repeat_interleave(
            block
        )
        for _ in range(_DRAWS if blocks > 1 else 0)
    ]
    return [*draws, *(torch.full((channels,), rho, dtype=torch.float64) for rho in (2.0, 0.5))]


def _worst(
    probe: Probe, layer: nn.Module, factor_sets: Sequence[Tensor], tolerance: float, with_bias: bool = True
) -> float:
    """The largest output change over ``factor_sets``, stopping at the first above ``tolerance``."""
    worst = 0.0
    for factors in factor_sets:
        worst = max(worst, probe.change(scale_layer(layer, factors, with_bias)))
        if worst > tolerance:
            break
    return worst


def block_sizes(model: nn.Module, layer: nn.Module, head_dim: int | None) -> list[int]:
    """Block sizes to try for ``layer``, finest first: 1, the head size, GroupNorms' channels per group, all."""
    channels = out_channels(layer)
    sizes = {1, channels}
    if head_dim:
        sizes.add(head_dim)
    sizes |= {m.num_channels // m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)}
    return sorted(s for s in sizes if channels % s == 0)


@dataclass
class Truth:
    """Ground truth for one model: a :class:`Verdict` per layer, and the output changes seen."""

    verdicts: dict[str, Verdict] = field(default_factory=dict)

    def invariant(self, real_eps: bool) -> dict[str, Verdict]:
        return {n: v for n, v in self.verdicts.items() if v.structural and (v.real_eps or not real_eps)}

    @property
    def gap(self) -> tuple[float, float]:
        """(largest change of an invariant test, smallest of a failed one), eps tiny: how far apart they are."""
        inv = [v.change for v in self.verdicts.values() if v.structural]
        fail = [v.change for v in self.verdicts.values() if not v.structural]
        return max(inv, default=0.0), min(fail, default=math.inf)


def layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv, ConvTranspose, Linear and Embedding module with a trainable weight (an embedding's rows are
    scaled as a layer's output channels)."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, _ConvNd | nn.Linear | nn.Embedding) and isinstance(getattr(m, "weight", None), nn.Parameter)
    }


def ground_truth(model: nn.Module, example: Any, head_dim: int | None = None, seed: int = 0) -> Truth:
    """The finest invariant grouping of every layer of ``model`` on ``example`` (the model is not changed).

    Args:
        model: any model; copied in float64.
        example: its input (a tensor, a tuple of positional or a dict of keyword arguments).
        head_dim: the attention head size, to try per-head groups and fused q/k/v projections.
    """
    gen = torch.Generator().manual_seed(seed)
    tiny = Probe(functional_copy(model, TINY_EPS), example)
    real = Probe(functional_copy(model, None), example)
    tiny_layers, real_layers = layers(tiny.model), layers(real.model)
    truth = Truth()
    for name, layer in tiny_layers.items():
        channels = out_channels(layer)
        verdict = Verdict(None, math.inf)
        # With the bias (it joins after a ReLU, is cancelled by BatchNorm), else without (weight standardization).
        biases = (True, False) if getattr(layer, "bias", None) is not None else (True,)
        tries = [(block, b) for block in block_sizes(tiny.model, layer, head_dim) for b in biases]
        for block, with_bias in tries:
            sets = _factor_sets(channels, block, gen)
            change = _worst(tiny, layer, sets, STRUCTURAL_TOLERANCE, with_bias)
            if change <= STRUCTURAL_TOLERANCE:
                real_change = _worst(real, real_layers[name], sets[-3:], REAL_EPS_TOLERANCE, with_bias)
                verdict = Verdict(block, change, real_change <= REAL_EPS_TOLERANCE, real_change, with_bias=with_bias)
                break
            verdict.change = min(verdict.change, change)
        # heads are blocks of a projection's rows; an embedding's blocks of rows no index of the example picks
        # would pass for invariant
        projection = not isinstance(layer, nn.Embedding)
        if not verdict.structural and projection and head_dim and channels > head_dim and channels % head_dim == 0:
            verdict = _heads_alone(tiny, real, layer, real_layers[name], head_dim, verdict)
        truth.verdicts[name] = verdict
    return truth


def _heads_alone(tiny: Probe, real: Probe, layer: nn.Module, real_layer: nn.Module, head_dim: int, failed: Verdict):
    """Each head block of a layer scaled alone (ρ = 2, 0.5): the invariant ones of a fused q/k/v projection."""
    channels, heads, changes, real_changes = out_channels(layer), [], [], []
    for h in range(channels // head_dim):
        sets = []
        for rho in (2.0, 0.5):
            factors = torch.ones(channels, dtype=torch.float64)
            factors[h * head_dim : (h + 1) * head_dim] = rho
            sets.append(factors)
        change = _worst(tiny, layer, sets, STRUCTURAL_TOLERANCE)
        if change <= STRUCTURAL_TOLERANCE:
            heads.append(h)
            changes.append(change)
            real_changes.append(_worst(real, real_layer, sets, REAL_EPS_TOLERANCE))
    if not heads:
        return failed
    worst_real = max(real_changes)
    return Verdict(None, max(changes), worst_real <= REAL_EPS_TOLERANCE, worst_real, tuple(heads))


def claim_change(
    model: nn.Module, example: Any, entries: Sequence[Any], eps: float | None = TINY_EPS, seed: int = 0
) -> dict[str, float]:
    """For each detected :class:`~lightning_sphere.core.groups.InvariantGroups`: the largest output change when
    its groups are scaled as the package defines them (the rows of each slice, ``num_groups`` consecutive
    runs), by random per-group factors and by ρ = 2 and 0.5. A change above the tolerance is a false positive.

    All entries are scaled at once first (invariant groups of different layers stay invariant together);
    only if that moves the output is each entry scaled alone, to find which. Unchanged entries get the
    joint change.
    """
    gen = torch.Generator().manual_seed(seed)
    probe = Probe(functional_copy(model, eps), example)
    params = dict(probe.model.named_parameters())
    claims = [(entry, [replace(s, param=params[s.name]) for s in entry.slices]) for entry in entries]
    draws = {entry.module_name: _factor_sets(entry.num_groups, 1, gen) for entry in entries}

    def worst(chosen: Sequence[tuple[Any, list[Any]]]) -> float:
        result = 0.0
        for i in range(_DRAWS + 2):
            scalings = []
            for entry, slices in chosen:
                factors = draws[entry.module_name][min(i, len(draws[entry.module_name]) - 1)]
                for s in slices:
                    scalings.append((s.param, _row_scaling(s, factors)))
            result = max(result, probe.change(scalings))
        return result

    if not claims:
        return {}
    joint = worst(claims)
    if joint <= STRUCTURAL_TOLERANCE:
        return {entry.module_name: joint for entry, _ in claims}
    return {entry.module_name: worst([(entry, slices)]) for entry, slices in claims}


def _row_scaling(s: Any, factors: Tensor) -> Callable[[Tensor], Tensor]:
    """Multiply the rows of slice ``s`` (its :meth:`~lightning_sphere.core.groups.ParamSlice.rows`), group by group."""

    def scale(t: Tensor) -> Tensor:
        out = t.clone()
        rows = s.rows(out)
        rows.mul_(factors.repeat_interleave(rows.shape[0] // len(factors))[:, None].to(rows.dtype))
        s.write_rows(out, rows)
        return out

    return scale
