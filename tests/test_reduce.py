import pytest
import torch

from lightning_sphere.measurement.reduce import REDUCTIONS, segment_reduce
from tests.reference import summarize


@pytest.mark.parametrize("how", REDUCTIONS)
def test_segment_reduce_matches_per_segment_statistics(how):
    gen = torch.Generator().manual_seed(0)
    segment = torch.tensor([0, 0, 0, 2, 2, 1, 0, 2, 2, 2, 1, 1])  # unsorted, uneven sizes
    values = torch.randn(3, segment.numel(), generator=gen, dtype=torch.float64)
    values[0, 1] = float("nan")
    values[1, 3] = float("inf")
    values[2, [5, 10, 11]] = float("nan")  # segment 1 entirely undefined in row 2
    result, count = segment_reduce(values, segment, 3, [how] * 3)
    for row in range(3):
        for seg in range(4):
            chosen = values[row] if seg == 3 else values[row, segment == seg]
            finite = chosen[chosen.isfinite()]
            assert count[row, seg] == finite.numel()
            if finite.numel():
                assert result[row, seg].item() == pytest.approx(summarize(finite, how), rel=1e-12)


def test_rows_use_their_own_reduction():
    values = torch.tensor([[1.0, 3.0], [-4.0, 2.0]])
    result, _ = segment_reduce(values, torch.tensor([0, 0]), 1, ["mean", "maxabs"])
    assert result.tolist() == [[2.0, 2.0], [4.0, 4.0]]


def test_unknown_reduction_is_refused():
    with pytest.raises(ValueError, match="mean"):
        segment_reduce(torch.zeros(1, 2), torch.zeros(2, dtype=torch.long), 1, ["average"])
