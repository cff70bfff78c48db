"""Names as the user wrote them through ``torch.compile`` and Lightning Fabric wrappers (issue 18, item 7), and the
plain API on a compiled model. The reference for every name is torch's own ``named_modules()`` /
``named_parameters()`` of the same model unwrapped."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

from lightning_sphere import SphereMonitor, find_invariant_groups
from lightning_sphere.core.names import get_submodule, named_modules, named_parameters
from tests.lightning_helpers import MemoryLogger, Net, fit


def compiled(module):
    return torch.compile(module, backend="eager")  # dynamo only: no compiler needed, fast on a CPU


def model():
    """conv → BN (per channel), then a block: conv → ReLU → BN (the bias joins) and a classifier."""
    stem = nn.Sequential(nn.Conv2d(1, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU())
    block = nn.Sequential(nn.Conv2d(6, 8, 3), nn.ReLU(), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(128, 10))
    return nn.Sequential(OrderedDict(stem=stem, head=nn.Sequential(block))).double()


def compiled_inside(plain):
    """The same modules, the block compiled two levels down."""
    return nn.Sequential(OrderedDict(stem=plain.stem, head=nn.Sequential(compiled(plain.head[0]))))


def fabric(module):
    from lightning.fabric import Fabric

    return Fabric(accelerator="cpu", devices=1).setup_module(module)


@pytest.mark.parametrize(
    "wrap",
    [compiled, compiled_inside, fabric, lambda m: fabric(compiled(m))],
    ids=["compiled", "compiled inside", "fabric", "fabric of compiled"],
)
def test_wrappers_are_transparent_to_names(wrap):
    plain = model()
    wrapped = wrap(plain)
    assert [n for n, _ in wrapped.named_modules()] != [n for n, _ in plain.named_modules()]  # torch's names differ
    assert [(n, type(m)) for n, m in named_modules(wrapped)] == [(n, type(m)) for n, m in plain.named_modules()]
    assert [(n, id(p)) for n, p in named_parameters(wrapped)] == [(n, id(p)) for n, p in plain.named_parameters()]
    assert get_submodule(wrapped, "head.0.2") is plain.get_submodule("head.0.2")
    with pytest.raises(AttributeError, match=r"head\.0\.9"):
        get_submodule(wrapped, "head.0.9")


def described(groups):
    return [(g.module_name, [s.name for s in g.slices], g.num_groups, g.norm_name) for g in groups]


def through_autograd(module):
    """Compiled with AOTAutograd, as the default backend does: its graph is one CompiledFunction node."""
    return torch.compile(module, backend="aot_eager")


@pytest.mark.parametrize(
    "wrap",
    [compiled, through_autograd, compiled_inside, fabric],
    ids=["compiled", "compiled through AOTAutograd", "compiled inside", "fabric"],
)
def test_the_plain_api_sees_through_wrappers(wrap):
    """Before: find_invariant_groups(torch.compile(net), x) found nothing ("output reaches
    CompiledFunctionBackward before any normalization"); Fabric's names began with ``_forward_module.``."""
    plain = model()
    x = torch.randn(16, 1, 8, 8, dtype=torch.float64)
    want = find_invariant_groups(plain, x)
    got = find_invariant_groups(wrap(plain), x)
    expected = [
        ("stem.0", ["stem.0.weight"], 6, "stem.1"),
        ("head.0.0", ["head.0.0.weight", "head.0.0.bias"], 8, "head.0.2"),
    ]
    assert described(got) == described(want) == expected
    assert [g.cosine for g in got] == pytest.approx([g.cosine for g in want], rel=1e-6)
    assert got.rejected == want.rejected == {"head.0.4": "output reaches the model's output before any normalization"}


class Compiled(Net):
    def __init__(self):
        super().__init__()
        self.net = compiled(self.net)


def test_a_compiled_and_an_uncompiled_run_log_the_same_keys(tmp_path):
    """Before: the compiled run logged ``sphere/…/net._orig_mod.0``."""
    runs = {}
    for model in (Net(), Compiled()):
        monitor, logger = SphereMonitor(per_layer=True), MemoryLogger()
        fit(model, tmp_path, [monitor], max_steps=2, logger=logger)
        keys = {k for record in logger.sphere().values() for k in record}
        runs[type(model).__name__] = (described(monitor.groups), keys, monitor.summary().splitlines()[0])
    assert runs["Compiled"] == runs["Net"]
    assert {"sphere/norm/net.0", "sphere/norm/net.3"} <= runs["Net"][1]
