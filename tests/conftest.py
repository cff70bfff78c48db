import os

import pytest
import torch
from hypothesis import settings
from torch import nn

from tests.torchvision_ops import define_torchvision_op_schemas

# Before any test module imports Lightning, which imports torchvision when it is installed.
define_torchvision_op_schemas()

#: The suite's seed: LIGHTNING_SPHERE_TEST_SEED=<n> reruns it with other random inputs (it must pass under any).
SEED = int(os.environ.get("LIGHTNING_SPHERE_TEST_SEED", "0"))


def _seed_everything(name: str) -> None:
    """torch, random and numpy from the suite's seed mixed with ``name``: reproducible, order-independent."""
    import random
    import zlib

    import numpy

    seed = (SEED * 1_000_003 + zlib.crc32(name.encode())) % 2**32
    torch.manual_seed(seed)
    random.seed(seed)
    numpy.random.seed(seed)


def pytest_collectstart(collector: pytest.Collector) -> None:
    """A test module's module-level inputs (drawn when it is imported) depend on the seed and its name only,
    not on which modules were imported before it."""
    if isinstance(collector, pytest.Module):
        _seed_everything(collector.nodeid)


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    """Every test starts from the suite's seed mixed with its own name."""
    _seed_everything(request.node.nodeid)


# Property tests: 60 examples by default, HYPOTHESIS_PROFILE=thorough for 2,000; no example database on disk.
settings.register_profile("default", max_examples=60, deadline=None, database=None)
settings.register_profile("thorough", max_examples=2000, deadline=None, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def bn_net(dtype: torch.dtype = torch.float64, eps: float = 1e-5) -> nn.Sequential:
    """Two tracked layers: conv → BN (bias-free) and conv → ReLU → BN (bias joins the group)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, bias=False),
        nn.BatchNorm2d(6, eps=eps),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3),
        nn.ReLU(),
        nn.BatchNorm2d(8, eps=eps),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    ).to(dtype)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` are skipped on machines without a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(16, 1, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 10, (16,), generator=gen)


# The tests' models are tiny: one thread is fastest, and immune to a busy second core (OpenMP threads
# spin-wait on each other, which makes a loaded machine tens of times slower).
torch.set_num_threads(1)


def torch_at_least(version: str, why: str) -> pytest.MarkDecorator:
    """Skip on a torch older than ``version`` (the suite also runs on the floor, ``.ci/versions floor``)."""
    from lightning_sphere.core.compat import release

    return pytest.mark.skipif(release() < release(version), reason=f"needs torch >= {version}: {why}")


#: Adam(decoupled_weight_decay=True), AdamW a subclass of Adam: torch 2.7.
DECOUPLED_ADAM = torch_at_least("2.7", "Adam(decoupled_weight_decay=True)")
#: torch.optim.Muon: torch 2.9.
MUON = torch_at_least("2.9", "torch.optim.Muon")
#: SphereMonitor under FSDP2: torch 2.9 (core/compat.py, "fsdp2").
FSDP2 = torch_at_least("2.9", "SphereMonitor under FSDP2")
