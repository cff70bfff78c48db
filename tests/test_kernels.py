"""The kernels' compile policy and its fallback; their math is tested through the tracker and corrections."""

import pytest
import torch

from lightning_sphere import kernels
from lightning_sphere.kernels.compiled import COMPILE_FROM, Kernels, should_compile


def test_compiling_pays_on_gpus_and_for_large_models():
    assert should_compile(COMPILE_FROM, torch.device("cpu"))
    assert not should_compile(COMPILE_FROM - 1, torch.device("cpu"))
    assert should_compile(10, torch.device("cuda"))


def test_a_compiler_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("no C++ compiler")

        return fail

    monkeypatch.setattr(kernels.torch, "compile", broken)
    k = Kernels(compiled=True)
    x = torch.randn(3, 5, dtype=torch.float64)
    one = torch.ones((), dtype=torch.float64)
    with pytest.warns(UserWarning, match="torch.compile failed.*no C\\+\\+ compiler.*eagerly"):
        got = k.sgd_products(x, x + 1, x, one, one)
    torch.testing.assert_close(got, kernels.sgd_products(x, x + 1, x, one, one))
    assert not k.compiled
    k.sgd_products(x, x, x, one, one)  # no second warning: eager from now on
