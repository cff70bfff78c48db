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


# ---------------------------------------------------------------------------------------------------------------
# Issue 22, item 2: the Fabric-native form, ``SphereCallback`` in ``Fabric(callbacks=[...])``.

from types import SimpleNamespace  # noqa: E402

from lightning_fabric.strategies import FSDPStrategy  # noqa: E402
from lightning_fabric.utilities.exceptions import MisconfigurationException  # noqa: E402

from lightning_sphere.fabric import SphereCallback  # noqa: E402
from tests import reference  # noqa: E402

REFERENCE_METRICS = ("norm", "angular_update", "radial_update", "tangential_update", "grad_cos", "effective_lr")


def group_rows(model) -> dict[str, torch.Tensor]:
    """bn_net's groups as float64 rows: `0` (the conv weight), `3` (weight and bias, one row per channel)."""
    return {
        "0": reference.rows(model[0].weight),
        "3": torch.cat([reference.rows(model[3].weight), model[3].bias.detach().double()[:, None]], 1),
    }


def grad_rows(model) -> dict[str, torch.Tensor]:
    return {
        "0": model[0].weight.grad.reshape(6, -1).double().clone(),
        "3": torch.cat([model[3].weight.grad.reshape(8, -1), model[3].bias.grad[:, None]], 1).double().clone(),
    }


def callback_run(callback: SphereCallback | None, steps: int = 6, fabric: Fabric | None = None, full_batch=False):
    """A Fabric loop of SGD with momentum on bn_net with ``callback`` (or none); per step, what was logged and the
    float64 rows of x_k, g, x_{k+1}; the weights at the end."""
    torch.manual_seed(0)
    fabric = fabric or Fabric(accelerator="cpu", devices=1, callbacks=[callback] if callback else None)
    plain = bn_net()
    model, optimizer = fabric.setup(plain, torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2))
    x, y = dataset(32)[:32]
    logged, captured = [], []
    for step in range(steps):
        batch = slice(None) if full_batch else slice(step % 2, None, 2)
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        fabric.call("on_before_backward", loss=loss)
        fabric.backward(loss)
        before, grads = group_rows(plain), grad_rows(plain)
        optimizer.step()
        fabric.call("on_train_batch_end")
        captured.append((before, grads, group_rows(plain)))
        logged.append(callback.metrics if callback else {})
    fabric.call("on_train_end")
    weights = {n: p.detach().clone() for n, p in plain.named_parameters()}
    return logged, captured, weights


def test_the_callback_logs_the_reference_metrics_from_the_first_step():
    """Every step logged: the first one too (its tracker is built inside that step's optimizer pre-hook), each
    against a float64 computation from the step's x_k, g and x_{k+1}."""
    callback = SphereCallback(log_every_n_steps=1, per_layer=True)
    logged, captured, _ = callback_run(callback, steps=3)
    assert [g.module_name for g in callback.groups] == ["0", "3"]
    assert callback.step == 3
    for step in (0, 2):
        x0, g, x1 = captured[step]
        for name in ("0", "3"):
            want = reference.group_metrics(x0[name], x1[name], g[name], 0.1)
            for metric in REFERENCE_METRICS:
                expected = reference.summarize(want[metric], reference.REDUCE[metric])
                got = logged[step][f"sphere/{metric}/{name}"]
                assert got == pytest.approx(expected, rel=1e-9, abs=1e-12), (step, name, metric)


def test_the_callback_logs_on_lightnings_cadence_and_leaves_training_bitwise_identical():
    callback = SphereCallback(log_every_n_steps=2)
    logged, _, weights = callback_run(callback)
    assert [bool(m) for m in logged] == [False, True, True, True, True, True]  # steps 1, 3, 5 log; kept after
    assert logged[1] != logged[3] != logged[5]
    assert set(logged[5]) >= {"sphere/effective_lr/all", "sphere/angular_update/0", "sphere/norm/3"}
    _, _, plain = callback_run(None)
    for name, value in plain.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=0, msg=name)
    # the hooks are gone after on_train_end: another run is not touched
    assert callback._hook is None


def test_the_callback_corrects_as_the_tracker_does():
    """``spherical_correction="srt"``: the same weights as the plain loop's SphereTracker (SGDMRT from step 0)."""
    callback = SphereCallback(log_every_n_steps=1, spherical_correction="srt")
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[callback])
    model = bn_net()
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2))
    x, y = dataset(32)[:32]
    for step in range(6):
        loss = torch.nn.functional.cross_entropy(model(x[step % 2 :: 2]), y[step % 2 :: 2])
        optimizer.zero_grad()
        fabric.call("on_before_backward", loss=loss)
        fabric.backward(loss)
        optimizer.step()
        fabric.call("on_train_batch_end")
    assert callback.tracker.corrections == {"0": "SGDMRT", "3": "SGDMRT"}
    fabric.call("on_train_end")
    _, _, scalars, want = run(Fabric(accelerator="cpu", devices=1), "srt", lr=0.1, momentum=0.9, weight_decay=1e-2)
    for key in ("sphere/angular_update/all", "sphere/norm/0", "sphere/effective_lr/3"):
        assert callback.metrics[key] == pytest.approx(scalars[key], rel=1e-12), key
    for name, value in want.items():
        torch.testing.assert_close(model.module.state_dict()[name], value, rtol=0, atol=0, msg=name)


def _two_rank_run(correction):
    """On each rank: the same full batch, so that DDP's averaged gradients are one process's."""
    import lightning_sphere.integrations.fabric  # noqa: F401  (spawned: import before the launch)

    torch.set_num_threads(1)
    callback = SphereCallback(log_every_n_steps=1, spherical_correction=correction)
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn", callbacks=[callback])
    return fabric.launch(_on_rank, callback)


def _on_rank(fabric, callback):
    logged, _, weights = callback_run(callback, steps=4, fabric=fabric, full_batch=True)
    everyone = fabric.all_gather(torch.tensor([logged[-1]["sphere/angular_update/all"]], dtype=torch.float64))
    lists = {name: value.tolist() for name, value in weights.items()}  # no tensors through the spawn's queue
    result = logged[-1], lists, everyone.flatten().tolist(), [g.module_name for g in callback.groups]
    # Tear gloo down before the process exits: left to the interpreter's exit, its threads were sometimes killed
    # joinable ("terminate called without an active exception", SIGABRT on one rank)
    fabric.barrier()
    torch.distributed.destroy_process_group()
    return result


@pytest.mark.parametrize("correction", ["srt"])  # measured too: its metrics are compared
def test_two_ddp_processes_measure_and_correct_as_one(correction):
    logged, weights, per_rank, names = _two_rank_run(correction)
    assert names == ["0", "3"]
    assert per_rank[0] == per_rank[1]
    callback = SphereCallback(log_every_n_steps=1, spherical_correction=correction)
    want_logged, _, want_weights = callback_run(callback, steps=4, full_batch=True)
    assert logged.keys() == want_logged[-1].keys()
    for key, value in want_logged[-1].items():
        assert logged[key] == pytest.approx(value, rel=1e-9, abs=1e-15), key
    for name, value in want_weights.items():
        torch.testing.assert_close(torch.tensor(weights[name], dtype=value.dtype), value, rtol=0, atol=0, msg=name)


def test_refusals_name_the_argument_and_the_fix():
    with pytest.raises(MisconfigurationException, match=r"`log_every_n_steps`\) must be a positive int"):
        SphereCallback(log_every_n_steps=True)
    with pytest.raises(MisconfigurationException, match="must be True, False, one of"):
        SphereCallback(spherical_correction="sideways")
    with pytest.raises(MisconfigurationException, match=r"does not support FSDPStrategy.*single device and DDP"):
        SphereCallback().on_after_setup(SimpleNamespace(strategy=FSDPStrategy()), bn_net())
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[SphereCallback(spherical_correction="srt")])
    plain = bn_net()
    model, optimizer = fabric.setup(plain, torch.optim.Adagrad(plain.parameters()))
    with pytest.raises(MisconfigurationException, match="SphereCallback follows one model"):
        fabric.setup(bn_net())
    x, y = dataset(16)[:16]
    fabric.backward(torch.nn.functional.cross_entropy(model(x), y))
    with pytest.raises(MisconfigurationException, match=r"spherical_correction=...\): .*Adagrad"):
        optimizer.step()  # the optimizer is met at its first step
    fabric.call("on_train_end")


def test_a_loop_that_never_calls_on_train_batch_end_is_told():
    """Forgetting the call logged nothing, silently (a new user's trial): now one warning says what to add."""
    from lightning.fabric import Fabric

    from lightning_sphere.fabric import SphereCallback

    torch.manual_seed(0)
    sphere = SphereCallback(log_every_n_steps=2)
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[sphere])
    model = torch.nn.Sequential(torch.nn.Linear(4, 8, bias=False), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    with pytest.warns(UserWarning, match='without `fabric.call\\("on_train_batch_end"\\)` between'):
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            fabric.call("on_before_backward", loss=loss)
            fabric.backward(loss)
            optimizer.step()
    fabric.call("on_train_end")
