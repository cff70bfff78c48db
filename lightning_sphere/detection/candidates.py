"""Candidate groups that follow from parameters alone, with no forward pass.

- weight normalization: each row of the direction tensor is invariant whatever follows (§1 table);
- the numeric test: every parameter of two or more dimensions, per output channel, else whole;
- a user's mapping from module or parameter names to a granularity.

All are verified by gradient orthogonality like the candidates read off the graph.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from torch import nn
from torch.nn.modules.conv import _ConvTransposeNd
from torch.nn.utils.parametrizations import _WeightNorm
from torch.nn.utils.weight_norm import WeightNorm

from lightning_sphere.core.groups import InvariantGroups, ParamSlice
from lightning_sphere.core.names import named_modules, named_parameters
from lightning_sphere.core.tolerance import GRADIENT_TEST
from lightning_sphere.detection.parametrized import parametrizations, stored_weight

#: Granularities a mapping may ask for, besides a number of channels per group.
GRANULARITIES = ("channel", "layer")

#: What to look for: ``"auto"`` (the graph, plus weight normalization), ``"numeric"`` (every parameter of two
#: or more dimensions, from its gradient alone) or a mapping from module or parameter names to a granularity.
GroupsSpec = str | Mapping[str, str | int]


def initial_candidates(
    model: nn.Module, groups: GroupsSpec
) -> tuple[list[InvariantGroups], dict[str, InvariantGroups], dict[str, str]]:
    """What ``groups`` asks for before any forward pass: the candidates, frozen ones included (they wait until
    they train); the coarser candidate to try when one fails its test, by module (numeric: per channel, then
    whole); and the modules left out, with the reason. ``"auto"`` adds the graph's candidates later.

    Raises:
        ValueError: for a ``groups`` of another kind, or a mapping the model does not fit.
    """
    if groups == "auto":
        return weight_norm_groups(model, trainable_only=False), {}, {}
    if groups == "numeric":
        pairs, shared = numeric_candidates(model, trainable_only=False)
        return [per_channel for per_channel, _ in pairs], {whole.module_name: whole for _, whole in pairs}, shared
    if isinstance(groups, Mapping):
        return mapped_groups(model, groups), {}, {}
    raise ValueError(f'groups must be "auto", "numeric" or a mapping of names to granularities, got {groups!r}')


def weight_norm_groups(model: nn.Module, trainable_only: bool = True) -> list[InvariantGroups]:
    """One group per row of each weight-normalized direction tensor (whole tensor for ``dim=None``).

    Covers ``torch.nn.utils.parametrizations.weight_norm`` and the older ``torch.nn.utils.weight_norm``.
    """
    names = {p: n for n, p in named_parameters(model)}
    found = []
    for module_name, module in named_modules(model):
        directions: list[tuple[str, nn.Parameter, int]] = []  # tensor name, direction, its dim
        for tensor_name, chain in parametrizations(module).items():
            if len(chain) == 1 and isinstance(chain[0], _WeightNorm):
                v = chain.original1  # the direction of weight_norm's (g, v)
                if isinstance(v, nn.Parameter):  # a buffer when the weight is one: nothing trainable
                    directions.append((tensor_name, v, chain[0].dim))
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm):
                directions.append((hook.name, getattr(module, f"{hook.name}_v"), hook.dim))
        for tensor_name, direction, dim in directions:
            if trainable_only and not direction.requires_grad:
                continue
            whole = dim is None or dim == -1
            piece = ParamSlice(names[direction], direction, () if whole else (dim % direction.dim(),))
            found.append(
                InvariantGroups(
                    module_name=module_name if tensor_name == "weight" else f"{module_name}.{tensor_name}",
                    slices=(piece,),
                    num_groups=piece.num_channels,
                    norm_name="",
                    norm_type="weight_norm",
                    granularity="layer" if whole else "channel",
                )
            )
    return found


def numeric_candidates(
    model: nn.Module, trainable_only: bool = True
) -> tuple[list[tuple[InvariantGroups, InvariantGroups]], dict[str, str]]:
    """For every trainable parameter of two or more dimensions (every one, unless ``trainable_only``): (one group
    per row of dim 0, one whole group), named after its module (the layer whose computed weight a
    parametrization's ``original`` or pruning's ``weight_orig`` is); and the other owners of a parameter shared
    by several modules (tied weights), module → why: the parameter is tested once, under its first owner."""
    computed_from = {}  # a stored tensor something computes a layer's weight from → that layer
    for module_name, module in named_modules(model):
        stored = stored_weight(module)
        if stored is not None and stored.computed_by is not None and len(stored.params) == 1:
            computed_from[stored.params[0]] = module_name
    pairs: list[tuple[InvariantGroups, InvariantGroups]] = []
    shared: dict[str, str] = {}
    first: dict[nn.Parameter, tuple[str, str]] = {}  # a parameter → (its candidate's name, its own name)
    for name, p in named_parameters(model, remove_duplicate=False):
        if not ((p.requires_grad or not trainable_only) and p.dim() >= 2):
            continue
        entry = computed_from.get(p) or name.removesuffix(".weight")
        if p in first:
            owner, tensor = first[p]
            shared[entry] = f"weight shared with {owner} (`{name}` is `{tensor}`), tested there"
            continue
        first[p] = (entry, name)
        per_row = InvariantGroups(entry, (ParamSlice(name, p),), p.shape[0], "", GRADIENT_TEST, "channel")
        whole = InvariantGroups(entry, (ParamSlice(name, p, ()),), 1, "", GRADIENT_TEST, "layer")
        pairs.append((per_row, whole))
    return pairs, shared


def mapped_groups(model: nn.Module, mapping: Mapping[str, str | int]) -> list[InvariantGroups]:
    """Groups a user named: module or parameter name → ``"channel"``, ``"layer"`` or channels per group.

    A module contributes its own trainable parameters (weight and bias), split along its output channels
    (dim 0; dim 1 of a ConvTranspose weight); a parameter name contributes that tensor alone, along dim 0.

    Raises:
        ValueError: for an unknown name (listing the valid ones) or a granularity the tensor cannot take.
    """
    modules = {name: m for name, m in named_modules(model) if name}
    params = dict(named_parameters(model, remove_duplicate=False))
    groups = []
    for key, granularity in mapping.items():
        if key in params:
            slices: tuple[ParamSlice, ...] = (ParamSlice(key, params[key]),)
        elif key in modules:
            slices = _module_slices(key, modules[key])
        else:
            raise ValueError(
                f"{key!r} is neither a module nor a parameter of the model; {_valid_names(key, modules, params)}"
            )
        channels = slices[0].num_channels
        groups.append(
            InvariantGroups(key, slices, _num_groups(key, granularity, channels), "", "explicit", _label(granularity))
        )
        if groups[-1].group_size < 2:
            raise ValueError(
                f"{key!r}: groups of {groups[-1].group_size} entry cannot be invariant; choose a coarser granularity"
            )
    return groups


def _module_slices(name: str, module: nn.Module) -> tuple[ParamSlice, ...]:
    """The module's own trainable parameters; for a weight something computes (a parametrization, pruning), the
    tensor it is computed from, which the optimizer steps."""
    own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    weight = "weight"
    stored = stored_weight(module)
    if stored is not None and stored.computed_by is not None and len(stored.params) == 1:
        original = stored.params[0]
        weight = next(n for n, p in module.named_parameters() if p is original)
        own = [(n, p) for n, p in own if p is not original]
        if original.requires_grad:
            own.insert(0, (weight, original))
    if not own:
        raise ValueError(f"module {name!r} has no trainable parameters of its own; name a parameter instead")
    slices = []
    for param_name, p in own:
        qualified = f"{name}.{param_name}"
        if isinstance(module, _ConvTransposeNd) and param_name == weight:
            split = module.groups
            slices.append(ParamSlice(qualified, p, (0, 2) if split > 1 else (1,), split))
        else:
            slices.append(ParamSlice(qualified, p))
    channels = {s.num_channels for s in slices}
    if len(channels) > 1:
        raise ValueError(f"the parameters of {name!r} have different numbers of output channels {sorted(channels)}")
    return tuple(slices)


def _num_groups(key: str, granularity: str | int, channels: int) -> int:
    if granularity == "channel":
        return channels
    if granularity == "layer":
        return 1
    if isinstance(granularity, int) and not isinstance(granularity, bool) and granularity > 0:
        if channels % granularity == 0:
            return channels // granularity
        divisors = [k for k in range(1, channels + 1) if channels % k == 0]
        raise ValueError(
            f"{key!r} has {channels} output channels: groups of {granularity} do not tile them; use one of {divisors}"
        )
    raise ValueError(
        f"{key!r}: granularity must be one of {GRANULARITIES} or a number of channels per group, got {granularity!r}"
    )


def _label(granularity: str | int) -> str:
    return granularity if isinstance(granularity, str) else "channel" if granularity == 1 else f"{granularity} channels"


def _valid_names(key: str, modules: Mapping[str, nn.Module], params: Mapping[str, nn.Parameter]) -> str:
    names = [*modules, *params]
    close = difflib.get_close_matches(key, names, n=5)
    listing = ", ".join(names) if len(names) <= 40 else ", ".join(names[:40]) + f", … ({len(names)} in all)"
    hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
    return f"{hint}valid names: {listing}"
