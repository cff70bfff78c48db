"""Parameters as rows of output channels, and the gradient-orthogonality test, against hand computations."""

import math

import pytest
import torch
from torch import nn

from lightning_sphere.core.groups import InvariantGroups, ParamSlice
from lightning_sphere.core.rows import RowIndex
from lightning_sphere.core.tolerance import GRADIENT_TEST, cosine_tolerance, indistinct, tolerance_for
from lightning_sphere.detection.gradient_test import gradient_cosines, verify

F64 = torch.float64


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---------------------------------------------------------------------- ParamSlice.rows / write_rows


def test_rows_of_a_contiguous_weight_are_a_view_in_channel_order():
    weight = nn.Parameter(randn(4, 3, 2, 2, seed=0))
    piece = ParamSlice("conv.weight", weight)
    assert piece.num_channels == 4
    t = weight.detach().clone()
    rows = piece.rows(t)
    assert rows.shape == (4, 12)
    for c in range(4):
        assert torch.equal(rows[c], t[c].flatten())
    rows[2, 5] = 100.0  # a view: writing a row entry writes the tensor
    assert t[2, 1, 0, 1] == 100.0
    assert (t != weight.detach()).sum() == 1


def test_rows_of_a_channels_last_weight_are_a_view_holding_each_channel():
    weight = nn.Parameter(randn(4, 3, 2, 2, seed=1).to(memory_format=torch.channels_last))
    piece = ParamSlice("conv.weight", weight)
    t = weight.detach().clone()
    assert t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    rows = piece.rows(t)
    assert rows.shape == (4, 12)
    for c in range(4):  # the entries of channel c, in some order
        assert torch.equal(rows[c].sort().values, t[c].flatten().sort().values)
        assert rows[c].sum() == pytest.approx(t[c].sum().item(), rel=1e-15)
    rows[1] = -7.0  # a view: the whole of channel 1 and nothing else
    expected = weight.detach().clone()
    expected[1] = -7.0
    assert torch.equal(t, expected)


def test_rows_of_differently_laid_out_tensors_line_up_entry_by_entry():
    """A channels_last weight's rows against a contiguous gradient's: per-row inner products are the
    per-channel ones, so both read each channel's entries in the same order."""
    weight = nn.Parameter(randn(5, 3, 3, 2, seed=2).to(memory_format=torch.channels_last))
    grad = randn(5, 3, 3, 2, seed=3)  # contiguous
    piece = ParamSlice("conv.weight", weight)
    got = (piece.rows(weight.detach()) * piece.rows(grad)).sum(1)
    want = torch.stack([(weight.detach()[c] * grad[c]).sum() for c in range(5)])
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-15)


def test_rows_of_a_non_contiguous_weight_are_a_copy():
    weight = nn.Parameter(randn(3, 4, 5, seed=4).permute(1, 2, 0))  # (4, 5, 3), strides (5, 1, 20)
    assert not weight.is_contiguous()
    piece = ParamSlice("w", weight)
    before = weight.detach().clone()
    rows = piece.rows(weight.detach())
    assert rows.shape == (4, 15)
    for c in range(4):
        assert torch.equal(rows[c].sort().values, before[c].flatten().sort().values)
    rows.add_(1.0)
    assert torch.equal(weight.detach(), before)  # a copy: the parameter is untouched


def laid_out(layout, seed):
    """A (4, 3, 2, 2) float64 tensor: contiguous, channels_last, or with the channel index innermost in memory."""
    if layout == "channels_inner":
        data = randn(2, 2, 4, 3, seed=seed).permute(2, 3, 0, 1)  # strides (3, 1, 24, 12)
        assert not data.is_contiguous() and not data.is_contiguous(memory_format=torch.channels_last)
        return data
    data = randn(4, 3, 2, 2, seed=seed)
    return data.to(memory_format=torch.channels_last) if layout == "channels_last" else data


@pytest.mark.parametrize(("layout", "view"), [("contiguous", True), ("channels_last", True), ("channels_inner", False)])
def test_write_rows_puts_modified_rows_back(layout, view):
    """The corrections' pattern: read rows, change them in place, write them back into the parameter. The
    rows are a view of the common layouts, a copy of the others."""
    weight = nn.Parameter(laid_out(layout, seed=5))
    before = weight.detach().clone()
    piece = ParamSlice("conv.weight", weight)
    rows = piece.rows(weight.detach())
    scale = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=F64)
    rows.mul_(scale[:, None])
    rows[3, 0] += 10.0  # one more entry of channel 3, wherever the rows put it
    assert torch.equal(weight.detach(), before) != view  # a view has changed the parameter already
    piece.write_rows(weight.detach(), rows)
    changed = weight.detach() - before * scale.view(4, 1, 1, 1)
    assert torch.equal(changed[:3], torch.zeros_like(changed[:3]))  # channels 0..2: exactly scaled
    assert (changed[3] != 0).sum() == 1  # channel 3: scaled, and one entry moved by 10
    assert changed[3].sum().item() == pytest.approx(10.0, abs=1e-12)


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_grouped_conv_transpose_rows_are_its_output_channels(groups):
    """A ConvTranspose weight is (C_in, C_out / groups, k, k): output channel (group, j) is the block of
    the group's input channels in column j. Checked against the entries each output channel depends on."""
    conv = nn.ConvTranspose2d(6, 6, 2, groups=groups).double()
    weight, per, ins = conv.weight, 6 // groups, 6 // groups
    assert weight.shape == (6, per, 2, 2)
    piece = ParamSlice("up.weight", weight, (0, 2) if groups > 1 else (1,), groups)
    assert piece.num_channels == 6
    index = torch.arange(weight.numel()).reshape(weight.shape)
    x = torch.rand(1, 6, 3, 3, generator=torch.Generator().manual_seed(6), dtype=F64) + 0.5
    for c in range(6):
        g, j = divmod(c, per)
        assert torch.equal(piece.rows(weight.detach())[c], weight.detach()[g * ins : (g + 1) * ins, j].flatten())
        (grad,) = torch.autograd.grad(conv(x)[:, c].sum(), weight)  # positive input: nonzero where it matters
        assert set(piece.rows(index)[c].tolist()) == set(index[grad != 0].tolist())


# ---------------------------------------------------------------------- tolerances and the orthogonality test


@pytest.mark.parametrize(("dtype", "eps"), [(torch.float16, 2**-10), (torch.bfloat16, 2**-7)], ids=["fp16", "bf16"])
def test_16_bit_tolerances_are_four_ulps(dtype, eps):
    assert torch.finfo(dtype).eps == eps
    four_ulps = 4 * torch.finfo(dtype).eps
    assert four_ulps > 1e-3
    assert cosine_tolerance(dtype) == four_ulps
    assert cosine_tolerance(dtype, 1e-4) == four_ulps
    assert cosine_tolerance(dtype, 0.1) == 0.1  # a wider tolerance is kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_32_and_64_bit_keep_the_tolerance(dtype):
    assert 4 * torch.finfo(dtype).eps < 1e-3
    assert cosine_tolerance(dtype) == 1e-3
    assert cosine_tolerance(dtype, 0.05) == 0.05


def tangent(x, seed):
    """A random unit vector orthogonal to ``x`` (float64)."""
    r = randn(*x.shape, seed=seed)
    r = r - (r * x).sum() / (x * x).sum() * x
    return r / r.norm()


def with_cosine(x, cos, seed, scale=3.0):
    """A gradient for ``x`` whose cosine with it is exactly ``cos`` (up to rounding)."""
    return scale * (cos * x / x.norm() + math.sqrt(1 - cos * cos) * tangent(x, seed))


def hand_cosine(groups):
    """max |cos(g, x)| over a module's groups, each a list of (x, g) pieces; groups with g = 0 left out."""
    values = []
    for pieces in groups:
        x = torch.cat([p.flatten() for p, _ in pieces])
        g = torch.cat([q.flatten() for _, q in pieces])
        if g.norm() > 0:
            values.append(((x @ g).abs() / (x.norm() * g.norm())).item())
    return max(values)


@pytest.fixture
def modules():
    """Hand-built entries and gradients: (entries by name, grads, expected cosine by name)."""
    w_a, b_a = nn.Parameter(randn(4, 3, seed=10)), nn.Parameter(randn(4, seed=11))
    w_b = nn.Parameter(randn(3, 2, 2, seed=12))
    w_c = nn.Parameter(randn(2, 5, seed=13))
    w_d, w_e, w_f = (nn.Parameter(randn(3, 4, seed=s)) for s in (14, 15, 16))
    entries = {
        # two groups of two channels, weight rows and bias entries together: not orthogonal
        "a": InvariantGroups(
            "a", (ParamSlice("a.weight", w_a), ParamSlice("a.bias", b_a)), 2, "bn_a", "BatchNorm1d", "2 channels"
        ),
        # one group per channel: orthogonal, one channel without gradient
        "b": InvariantGroups("b", (ParamSlice("b.weight", w_b),), 3, "bn_b", "BatchNorm2d"),
        # the whole tensor, |cos| = 0.05: above 0.1/√10 = 0.032, a tenth of a random direction's 1/√d
        "c": InvariantGroups("c", (ParamSlice("c.weight", w_c, ()),), 1, "ln_c", "LayerNorm", "layer"),
        "d": InvariantGroups("d", (ParamSlice("d.weight", w_d),), 3, "bn_d", "BatchNorm1d"),  # zero gradient
        "e": InvariantGroups("e", (ParamSlice("e.weight", w_e),), 3, "bn_e", "BatchNorm1d"),  # no gradient at all
        "f": InvariantGroups("f", (ParamSlice("f.weight", w_f),), 3, "bn_f", "BatchNorm1d"),  # an inf entry
    }
    g_a, gb_a = randn(4, 3, seed=20), randn(4, seed=21)
    x_b = w_b.detach()
    g_b = torch.stack([tangent(x_b[0], 22), torch.zeros(2, 2, dtype=F64), 5 * tangent(x_b[2], 23)])
    g_c = with_cosine(w_c.detach(), 0.05, 24)
    g_f = randn(3, 4, seed=25)
    g_f[1, 2] = float("inf")
    grads = {w_a: g_a, b_a: gb_a, w_b: g_b, w_c: g_c, w_d: torch.zeros(3, 4, dtype=F64), w_f: g_f}
    x_a, xb_a = w_a.detach(), b_a.detach()
    pair = slice(0, 2), slice(2, 4)  # the channels of each group of "a"
    expected = {
        "a": hand_cosine([[(x_a[k], g_a[k]), (xb_a[k], gb_a[k])] for k in pair]),
        "b": hand_cosine([[(x_b[c], g_b[c])] for c in range(3)]),
        "c": hand_cosine([[(w_c.detach(), g_c)]]),
    }
    return entries, grads, expected


def test_hand_built_gradients_have_the_intended_cosines(modules):
    """The fixture itself: a clearly non-orthogonal module, an orthogonal one and |cos| = 0.05."""
    _, _, expected = modules
    assert expected["a"] > 0.1
    assert expected["b"] < 1e-14
    assert expected["c"] == pytest.approx(0.05, rel=1e-12)


def test_gradient_cosines_match_the_hand_computation(modules):
    entries, grads, expected = modules
    got = gradient_cosines([entries[n] for n in "abcdf"], grads)
    assert got[0] == pytest.approx(expected["a"], rel=1e-12)
    assert got[1] == pytest.approx(expected["b"], abs=1e-15)  # the zero-gradient channel is left out, not NaN
    assert got[2] == pytest.approx(expected["c"], rel=1e-12)
    assert got[3] is None  # no group has a gradient: cannot be judged
    assert got[4] is None  # a non-finite gradient: cannot be judged
    assert gradient_cosines([], grads) == []


def test_verify_accepts_orthogonal_rejects_the_rest_and_waits_without_a_gradient(modules):
    entries, grads, expected = modules
    accepted, rejected, undecided = verify(list(entries.values()), grads)
    assert [e.module_name for e in accepted] == ["b"]
    assert [e.module_name for e in rejected] == ["a", "c"]
    assert sorted(e.module_name for e in undecided) == ["d", "e", "f"]
    assert accepted[0].cosine == pytest.approx(expected["b"], abs=1e-15)
    assert rejected[0].cosine == pytest.approx(expected["a"], rel=1e-12)
    assert rejected[1].cosine == pytest.approx(expected["c"], rel=1e-12)
    assert all(e.cosine is None for e in undecided)
    assert all(e.cosine is None for e in entries.values())  # the inputs are left as they were
    assert accepted[0].slices is entries["b"].slices and accepted[0].num_groups == 3


@pytest.mark.parametrize(
    ("tolerance", "compute_dtype", "accepted"),
    [
        (None, None, False),  # 0.05 > 0.1/√10 = 0.032
        (0.2, None, True),  # 0.2/√10 = 0.063
        (0.01, torch.float16, False),  # four float16 ulps: 3.9e-3 < 0.05
        (0.01, torch.bfloat16, False),  # four bfloat16 ulps: 3.1e-2 < 0.05
    ],
    ids=["fp32-default", "fp32-wider", "fp16", "bf16"],
)
def test_verify_tolerance_widens_for_16_bit_compute(modules, tolerance, compute_dtype, accepted):
    entries, grads, _ = modules
    yes, no, waiting = verify([entries["c"]], grads, tolerance, compute_dtype)
    assert (len(yes), len(no), len(waiting)) == ((1, 0, 0) if accepted else (0, 1, 0))


@pytest.mark.parametrize("d", [9, 240, 4608, 10**6])
def test_the_threshold_is_a_share_of_a_random_directions_cosine(d):
    """δ/√d: a random direction in d dimensions has E cos² = 1/d (checked here by sampling), so the test keeps
    its power at any d; 16-bit gradients floor it at four ulps, and where that floor reaches half of 1/√d
    the test cannot tell (accepted on structure alone, refused for numeric candidates)."""
    p = nn.Parameter(torch.zeros(d, dtype=F64))
    structural = InvariantGroups("s", (ParamSlice("s", p, ()),), 1, "ln", "LayerNorm", "layer")
    numeric = InvariantGroups("n", (ParamSlice("n", p, ()),), 1, "", GRADIENT_TEST, "layer")
    assert tolerance_for(structural) == pytest.approx(0.1 / d**0.5, rel=1e-12)
    assert tolerance_for(numeric) == pytest.approx(0.01 / d**0.5, rel=1e-12)
    assert tolerance_for(structural, 0.5) == pytest.approx(0.5 / d**0.5, rel=1e-12)
    bf16 = 4 * 2.0**-7
    assert tolerance_for(structural, compute_dtype=torch.bfloat16) == max(0.1 / d**0.5, bf16)
    assert indistinct(structural, torch.bfloat16) == (bf16 >= 0.5 / d**0.5)
    assert not indistinct(structural)
    if d <= 4608:  # a sample of random directions: mean cos² is 1/d
        g = torch.randn(2000, d, generator=torch.Generator().manual_seed(d), dtype=F64)
        x = torch.randn(d, generator=torch.Generator().manual_seed(d + 1), dtype=F64)
        cos = g @ x / (g.norm(dim=1) * x.norm())
        assert (cos.square().mean() * d).item() == pytest.approx(1, rel=0.1)
        share = (cos.abs() <= tolerance_for(numeric)).double().mean().item()
        assert share == pytest.approx(0.008, abs=0.006)  # ≈ 0.8 δ of random directions pass a numeric test


def test_verify_reads_a_generator_once(modules):
    entries, grads, _ = modules
    accepted, rejected, undecided = verify((entries[n] for n in "bce"), grads)
    assert [[e.module_name for e in part] for part in (accepted, rejected, undecided)] == [["b"], ["c"], ["e"]]


def test_write_rows_copies_rows_that_are_a_view_of_another_tensor():
    w = nn.Parameter(randn(3, 4, seed=30))
    other = randn(3, 4, seed=31)
    s = ParamSlice("w", w)
    s.write_rows(w.detach(), s.rows(other))  # a view, but of `other`
    assert torch.equal(w.detach(), other)


def test_row_index_sums_spreads_and_selects_by_hand(modules):
    """Per-group sums of per-row values, per-group values back on rows, and a part of the index, against
    the group of every row written out by hand for entries "a" (2 groups of 2 channels, weight + bias),
    "b" (3 channels) and "c" (the whole tensor: one row, one group)."""
    entries, _, _ = modules
    index = RowIndex([entries[n] for n in "abc"], torch.device("cpu"))
    # rows: a.weight (4), a.bias (4), b.weight (3), c.weight (1); groups: a → 0, 1; b → 2, 3, 4; c → 5
    group_of_row = [0, 0, 1, 1, 0, 0, 1, 1, 2, 3, 4, 5]
    assert index.group_of_row.tolist() == group_of_row and index.num_groups == 6
    assert index.groups == [slice(0, 2), slice(2, 5), slice(5, 6)]
    per_row = [randn(n, 2, seed=40 + i) for i, n in enumerate([4, 4, 3, 1])]
    rows = torch.cat(per_row)
    want = torch.stack([rows[[r for r, g in enumerate(group_of_row) if g == k]].sum(0) for k in range(6)])
    torch.testing.assert_close(index.sum_rows(per_row), want, rtol=1e-15, atol=0)
    per_group = torch.arange(6, dtype=F64) * 10
    spread = index.spread(per_group)
    assert [c.shape for c in spread] == [(4, 1), (4, 1), (3, 1), (1, 1)]
    assert torch.cat(spread)[:, 0].tolist() == [10.0 * g for g in group_of_row]
    assert index.per_module([1.5, 2.5, 3.5]).tolist() == [1.5, 1.5, 2.5, 2.5, 2.5, 3.5]
    part = index.select(1, 3)  # "b" and "c" alone, numbered from zero
    assert [e.module_name for e in part.entries] == ["b", "c"] and part.num_groups == 4
    assert part.group_of_row.tolist() == [0, 1, 2, 3] and part.groups == [slice(0, 3), slice(3, 4)]
    torch.testing.assert_close(part.sum_rows(per_row[2:]), want[2:], rtol=1e-15, atol=0)


# ---------------------------------------------------------------------- ParamSlice.channels (row ranges)


def test_a_channel_range_is_a_view_of_those_rows_and_counts_only_them():
    weight = nn.Parameter(randn(6, 3, seed=7))
    piece = ParamSlice("qkv.weight", weight, channels=(0, 4))
    rows = piece.rows(weight.detach())
    assert piece.num_channels == 4 and piece.numel == 12
    assert torch.equal(rows, weight.detach()[:4]) and rows.data_ptr() == weight.data_ptr()
    entry = InvariantGroups(
        "qkv", (piece, ParamSlice("qkv.bias", nn.Parameter(randn(6, seed=8)), channels=(0, 4))), 2, "", ""
    )
    assert (entry.numel, entry.group_size) == (16, 8)


def test_write_rows_of_a_channel_range_leaves_the_other_rows_alone():
    weight = randn(6, 3, seed=9).t().contiguous().t()  # column-major: rows are a copy
    piece = ParamSlice("qkv.weight", nn.Parameter(weight.clone()), channels=(2, 5))
    rows = piece.rows(weight)
    assert rows.data_ptr() != weight.data_ptr()
    expected = weight.clone()
    expected[2:5] = 7.0
    piece.write_rows(weight, torch.full_like(rows, 7.0))
    assert torch.equal(weight, expected)


def test_row_index_and_cosines_of_a_channel_range_match_the_hand_computation():
    weight = nn.Parameter(randn(6, 3, seed=10))
    grad = randn(6, 3, seed=11)
    entry = InvariantGroups("qkv", (ParamSlice("qkv.weight", weight, channels=(2, 6)),), 2, "", "")
    index = RowIndex([entry], torch.device("cpu"))
    assert index.rows_per_slice == [4] and index.group_of_row.tolist() == [0, 0, 1, 1]
    x, g = weight.detach()[2:].reshape(2, 6), grad[2:].reshape(2, 6)
    expected = ((x * g).sum(1) / (x.norm(dim=1) * g.norm(dim=1))).abs().max().item()
    assert gradient_cosines([entry], {weight: grad})[0] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "kwargs", [{"channels": (0, 7)}, {"channels": (3, 3)}, {"channels": (0, 2), "channel_dims": (1,)}]
)
def test_an_invalid_channel_range_is_refused(kwargs):
    with pytest.raises(ValueError, match="range of the rows"):
        ParamSlice("w", nn.Parameter(torch.ones(6, 3)), **kwargs)


def test_reprs_name_parameters_and_shapes_not_their_values():
    from lightning_sphere.core.groups import InvariantGroups, ParamSlice

    weight = torch.nn.Parameter(torch.randn(64, 3, 3, 3))
    piece = ParamSlice("conv.weight", weight)
    assert repr(piece) == "ParamSlice('conv.weight', 64×3×3×3 float32)"
    qkv = ParamSlice("attn.qkv.weight", torch.nn.Parameter(torch.randn(96, 32)), channels=(0, 64))
    assert repr(qkv) == "ParamSlice('attn.qkv.weight', 96×32 float32, channels=(0, 64))"
    group = InvariantGroups("conv", (piece,), 64, "bn", "BatchNorm2d")
    assert len(repr(group)) < 200 and "conv.weight" in repr(group)
