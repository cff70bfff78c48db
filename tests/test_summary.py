"""The table printed at the start of training, against hand-counted parameters and hand-laid columns."""

import pytest
import torch
from torch import nn

from lightning_sphere.core.groups import InvariantGroups, ParamSlice
from lightning_sphere.reporting.summary import summarize

HEADER = ["module", "granularity", "groups", "d", "normalization", "max|cos(g,x)|"]
LEFT = {0, 1, 4, 6}  # module, granularity, normalization, correction; the numbers are right-aligned


@pytest.fixture
def model_and_groups():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, bias=False),  # 72
        nn.BatchNorm2d(4),  # 4 + 4, its weight frozen below
        nn.Conv2d(4, 6, 3),  # 216 + 6
        nn.GroupNorm(3, 6),  # 6 + 6
        nn.Flatten(),
        nn.Linear(600, 10),  # 6,000 + 10
    )
    model[1].weight.requires_grad_(False)
    conv, linear = model[2], model[5]
    groups = [
        InvariantGroups(
            "2",
            (ParamSlice("2.weight", conv.weight), ParamSlice("2.bias", conv.bias)),
            num_groups=3,
            norm_name="3",
            norm_type="GroupNorm",
            granularity="2 channels",
            cosine=2.5e-5,
        ),
        InvariantGroups("5", (ParamSlice("5.weight", linear.weight, ()),), 1, "", "weight_norm", "layer"),
    ]
    return model, groups


#: The two rows, by hand: d = 222 / 3 and 6,000 / 1; the cosine in one significant digit and an exponent.
ROWS = [
    ["2", "2 channels", "3", "74", "3 (GroupNorm)", "2.5e-05"],
    ["5", "layer", "1", "6,000", "weight_norm", "-"],
]


def spans(line, cells):
    """Where each cell sits in ``line``, as (start, end), with only padding around them."""
    out, pos = [], 0
    for cell in cells:
        start = line.index(cell, pos)
        assert line[pos:start].strip() == "", (line, cell)
        out.append((start, start + len(cell)))
        pos = start + len(cell)
    assert pos == len(line), line  # nothing after the last cell, not even spaces
    return out


def assert_columns(lines, table, widths):
    """Every column is as wide as its widest cell, two spaces apart, its cells flush left or right."""
    assert len(lines) == len(table)
    where = [spans(line, cells) for line, cells in zip(lines, table, strict=True)]
    start = 0
    for i, width in enumerate(widths):
        column = [w[i] for w in where]
        if i in LEFT:
            assert {s for s, _ in column} == {start}, (i, column)
        else:
            assert {e for _, e in column} == {start + width}, (i, column)
        assert max(e - s for s, e in column) == width, i
        start += width + 2


def test_header_line_counts_modules_groups_and_tracked_parameters(model_and_groups):
    model, groups = model_and_groups
    total = 72 + 4 + 222 + 12 + 6010  # trainable: the frozen BatchNorm weight is left out
    tracked = 222 + 6000
    share = f"{100 * tracked / total:.1f}%"
    assert share == "98.4%"
    first = summarize(groups, model).split("\n")[0]
    assert first == (
        "lightning_sphere: 2 modules, 4 radially invariant groups, 6,222 of 6,320 trainable parameters tracked (98.4%)"
    )


def test_rows_and_column_alignment(model_and_groups):
    model, groups = model_and_groups
    lines = summarize(groups, model).split("\n")
    assert len(lines) == 4  # header line, table header, two rows; nothing untracked
    # widest cells: "module", "granularity", "groups", "6,000", "normalization" / "3 (GroupNorm)", the cosine header
    assert_columns(lines[1:], [HEADER, *ROWS], [6, 11, 6, 5, 13, 13])
    assert lines[2] == "2       2 channels        3     74  3 (GroupNorm)        2.5e-05"


def test_correction_column_and_untracked_section(model_and_groups):
    model, groups = model_and_groups
    untracked = {"0": "weight is frozen", "7": "not stepped by any optimizer"}
    lines = summarize(groups, model, untracked, corrections={"2": "AdamSRT"}).split("\n")
    table = [[*HEADER, "correction"], [*ROWS[0], "AdamSRT"], [*ROWS[1], "-"]]
    assert_columns(lines[1:4], table, [6, 11, 6, 5, 13, 13, 10])
    assert lines[4:] == ["not tracked:", "  0: weight is frozen", "  7: not stepped by any optimizer"]


def test_empty_mappings_add_nothing(model_and_groups):
    model, groups = model_and_groups
    assert summarize(groups, model, untracked={}, corrections={}) == summarize(groups, model)
    assert "correction" not in summarize(groups, model)


def test_no_trainable_parameters():
    line = "lightning_sphere: 0 modules, 0 radially invariant groups, 0 of 0 trainable parameters tracked (-)"
    assert summarize([], nn.Linear(3, 2).requires_grad_(False)) == line
    assert summarize([], nn.ReLU(), {"relu": "no parameters"}) == f"{line}\nnot tracked:\n  relu: no parameters"


def test_one_module_of_one_group_is_said_in_the_singular():
    """Issue 11: the summary said "1 modules"."""
    from lightning_sphere import find_invariant_groups

    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.LayerNorm(3))
    groups = find_invariant_groups(model, torch.randn(8, 4))
    assert summarize(groups, model).splitlines()[0] == (
        "lightning_sphere: 1 module, 1 radially invariant group, 12 of 18 trainable parameters tracked (66.7%)"
    )


def test_rows_and_reasons_come_in_model_order(model_and_groups):
    """Issue 18: in the order given, which detection's order decided (reentrant checkpointing: 0, 2, 1)."""
    model, groups = model_and_groups
    untracked = {"5.weight": "a parameter below module 5", "7": "not a module of the model", "0": "weight is frozen"}
    lines = summarize(groups[::-1], model, untracked).split("\n")
    assert [line.split()[0] for line in lines[2:4]] == ["2", "5"]  # model.named_modules(): 0, 1, 2, 3, 4, 5
    assert lines[4:] == [
        "not tracked:",
        "  0: weight is frozen",
        "  5.weight: a parameter below module 5",
        "  7: not a module of the model",  # unknown names last
    ]
