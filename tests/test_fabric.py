"""Issue 18, item 6: Lightning Fabric's wrapped model and optimizers go into the framework-free core as they are.

Before: ``SphereTracker(groups, [fabric_optimizer], correction="srt", model=...)`` raised "FabricSGD has no
spherical form here" (Fabric makes up a class per optimizer), and layers were named ``_forward_module.0``. The
ground truth is the same loop without Fabric: Fabric on one CPU device runs the same arithmetic.
"""

from __future__ import annotations

import pytest
import torch
from lightning.fabric import Fabric

from lightning_sphere import SphereTracker, find_invariant_groups
from tests.conftest import bn_net
from tests.lightning_helpers import dataset


def run(fabric: Fabric | None, correction: str | None, optimizer_class=torch.optim.SGD, **options):
    """Six steps of a plain or a Fabric loop on the same batches; the last measurement and the weights."""
    model = bn_net()
    optimizer = optimizer_class(model.parameters(), **options)
    if fabric is not None:
        model, optimizer = fabric.setup(model, optimizer)
    x, y = dataset(32)[:32]
    tracker = SphereTracker(find_invariant_groups(model, x[:16]), [optimizer], correction=correction, model=model)
    scalars = {}
    for step in range(6):
        tracker.arm()
        loss = torch.nn.functional.cross_entropy(model(x[step % 2 :: 2]), y[step % 2 :: 2])
        optimizer.zero_grad()
        if fabric is not None:
            fabric.backward(loss)
        else:
            loss.backward()
        optimizer.step()
        scalars = tracker.collect().scalars
    names = [g.module_name for g in tracker.groups]
    corrections = tracker.corrections
    tracker.close()
    weights = {n: p.detach().clone() for n, p in (model.module if fabric else model).named_parameters()}
    return names, corrections, scalars, weights


@pytest.mark.parametrize(
    ("optimizer_class", "options", "label"),
    [
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}, "SGDMRT"),
        (torch.optim.SGD, {"lr": 0.1, "weight_decay": 1e-2}, "AdamG (SGD rewrite)"),
        (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}, "AdamSRT"),
    ],
)
def test_a_fabric_loop_is_measured_and_corrected_as_the_plain_loop(optimizer_class, options, label):
    fabric = Fabric(accelerator="cpu", devices=1)
    got = run(fabric, "srt", optimizer_class, **options)
    want = run(None, "srt", optimizer_class, **options)
    assert got[0] == want[0] == ["0", "3"]  # named as written: no `_forward_module.` prefix
    assert got[1] == want[1] == {"0": label, "3": label}
    assert got[2].keys() == want[2].keys()
    for key, value in want[2].items():
        assert got[2][key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    for name, value in want[3].items():
        torch.testing.assert_close(got[3][name], value, rtol=0, atol=0, msg=name)
