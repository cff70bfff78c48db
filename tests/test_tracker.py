"""The framework-free engine against an independent computation from captured weights and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sphere import SphereTracker, find_invariant_groups
from lightning_sphere.measurement.metrics import HISTOGRAMS
from tests import reference
from tests.conftest import DECOUPLED_ADAM, bn_net

LAYERS = {"0": 0, "3": 3}  # tracked module name → index in bn_net


def group_rows(model, name, tensor_of):
    """A float64 CPU copy of the rows of one tracked module's groups: conv weight rows, plus the bias entry
    where it joins."""
    layer = model[LAYERS[name]]
    parts = [reference.rows(tensor_of(layer.weight))]
    if layer.bias is not None:  # module "3": conv → ReLU → BN, the bias is not cancelled
        parts.append(tensor_of(layer.bias).detach().to("cpu", torch.float64, copy=True)[:, None])
    return torch.cat(parts, 1)


def captured_step(model, optimizer, batch, tracker, check_step=True):
    """One armed step: the measurement and, per module, the reference metrics and the captured rows."""
    x, y = batch
    tracker.arm(histograms=True)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    before = {name: group_rows(model, name, lambda t: t) for name in LAYERS}
    optimizer.step()
    captured, rows = {}, {}
    for name in LAYERS:
        layer = model[LAYERS[name]]
        group = next(g for g in optimizer.param_groups if any(p is layer.weight for p in g["params"]))
        x1 = group_rows(model, name, lambda t: t)
        grad = group_rows(model, name, lambda t: t.grad)
        kwargs = {}
        adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))  # AdamW is an Adam from torch 2.7
        if adam:
            kwargs = adam_direction(model, name, optimizer, group)
        if adam and check_step:
            # The reconstructed a, b reproduce the step torch took (AdamW: after its decoupled decay).
            decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
            decayed = before[name] * (1 - group["lr"] * group["weight_decay"]) if decoupled else before[name]
            torch.testing.assert_close(x1, decayed - group["lr"] * kwargs["a"] / kwargs["b"], rtol=1e-12, atol=1e-14)
        measured = type(optimizer) not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
        captured[name] = reference.group_metrics(before[name], x1, grad, group["lr"], measured=measured, **kwargs)
        rows[name] = {"x0": before[name], "x1": x1, "grad": grad, **kwargs}
    return tracker.collect(), captured, rows


def adam_direction(model, name, optimizer, group):
    beta1, beta2 = group["betas"]

    def a_of(p):
        st = optimizer.state[p]
        return st["exp_avg"].double() / (1 - beta1 ** st["step"].item())

    def b_of(p):
        st = optimizer.state[p]
        v = st["max_exp_avg_sq"] if group["amsgrad"] else st["exp_avg_sq"]
        return v.double().sqrt() / math.sqrt(1 - beta2 ** st["step"].item()) + group["eps"]

    return {"a": group_rows(model, name, a_of), "b": group_rows(model, name, b_of)}


def assert_matches(measurement, captured, rtol=1e-9, atol=1e-13):
    metrics = set().union(*captured.values())
    for metric in metrics:
        per_layer = {name: values[metric] for name, values in captured.items()}
        per_layer["all"] = torch.cat(list(per_layer.values()))
        for name, values in per_layer.items():
            expected = reference.summarize(values, reference.REDUCE[metric])
            got = measurement.scalars[f"sphere/{metric}/{name}"]
            assert got == pytest.approx(expected, rel=rtol, abs=atol), f"{metric}/{name}"
    for metric in HISTOGRAMS:
        for name, values in captured.items():
            got = measurement.histograms[f"sphere_hist/{metric}/{name}"]
            torch.testing.assert_close(got, values[metric], rtol=rtol, atol=atol)


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-2),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adam-decoupled": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5),
}


def optimizer_names(names=None):
    """The keys of OPTIMIZERS as parameters, each marked with the torch it needs."""
    return [pytest.param(n, marks=DECOUPLED_ADAM) if n == "adam-decoupled" else n for n in names or OPTIMIZERS]


def measured_after_warmup(name, batch, device="cpu", dtype=torch.float64, compile=None, check_step=True):
    """``bn_net`` on ``device`` in ``dtype``, stepped three times by ``OPTIMIZERS[name]``, then one step
    measured: what :func:`captured_step` returns (the captured rows and references on the CPU, in float64)."""
    model = bn_net(dtype).to(device)
    batch = batch[0].to(device, dtype), batch[1].to(device)
    optimizer = OPTIMIZERS[name](model.parameters())
    tracker = SphereTracker(find_invariant_groups(model, batch[0]), [optimizer], compile=compile)
    for _ in range(3):  # let momenta build up
        optimizer.zero_grad()
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        optimizer.step()
    return captured_step(model, optimizer, batch, tracker, check_step)


@pytest.mark.parametrize("name", optimizer_names())
def test_every_metric_matches_the_reference(name, batch):
    measurement, captured, rows = measured_after_warmup(name, batch)
    assert_matches(measurement, captured)
    adaptive = name.startswith("adam")
    if adaptive:  # §3, exactly: sin θ = η^e ‖c⊥‖ with c = r_k a ⊘ (b / rms(b)), from the captured state
        step = rows["0"]
        r0 = step["x0"].norm(dim=1, keepdim=True)
        c = r0 * step["a"] / (step["b"] / (step["b"].norm(dim=1, keepdim=True) / step["b"].shape[1] ** 0.5))
        c_perp = reference.perp(c, step["x0"] / r0).norm(dim=1)
        sin_theta = measurement.histograms["sphere_hist/angular_update/0"].sin()
        torch.testing.assert_close(
            sin_theta, measurement.histograms["sphere_hist/effective_lr/0"] * c_perp, rtol=1e-10, atol=0
        )
    assert ("sphere/deformation_cos/all" in measurement.scalars) == adaptive
    assert ("sphere/momentum_radial/all" in measurement.scalars) == adaptive
    assert measurement.scalars["sphere/skipped_groups/all"] == 0


def test_sgd_with_weight_decay_exact_identities(batch):
    """§3: radial part exactly −ηλ (BN eps tiny so that ⟨g, x⟩ = 0), η^e = η/(r_k r_{k+1}), sin θ = η^e ‖∇L(u_k)‖."""
    model = bn_net(eps=1e-14)
    lr, wd = 0.1, 1e-2
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    tracker = SphereTracker(find_invariant_groups(model, batch[0]), [optimizer])
    tracker.arm(histograms=True)
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    x0, g = reference.rows(model[0].weight), reference.rows(model[0].weight.grad)
    optimizer.step()
    x1 = reference.rows(model[0].weight)
    measurement = tracker.collect()
    for name in LAYERS:
        assert measurement.scalars[f"sphere/radial_update/{name}"] == pytest.approx(-lr * wd, rel=1e-9)
        assert measurement.scalars[f"sphere/grad_cos/{name}"] < 1e-9
    r0, r1 = x0.norm(dim=1), x1.norm(dim=1)
    elr = measurement.histograms["sphere_hist/effective_lr/0"]
    torch.testing.assert_close(elr, lr / (r0 * r1), rtol=1e-12, atol=0)
    riemannian = r0 * reference.perp(g, x0 / r0[:, None]).norm(dim=1)
    theta = measurement.histograms["sphere_hist/angular_update/0"]
    torch.testing.assert_close(theta.sin(), elr * riemannian, rtol=1e-10, atol=0)
    equilibrium = math.acos(1 - lr * wd)
    assert measurement.scalars["sphere/angular_update_equilibrium/all"] == pytest.approx(equilibrium, rel=1e-12)


def test_unarmed_steps_record_nothing(batch):
    model = bn_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = SphereTracker(find_invariant_groups(model, batch[0]), [optimizer])
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        optimizer.step()
        assert tracker.collect() is None
    tracker.arm()
    optimizer.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    optimizer.step()
    measurement = tracker.collect()
    assert measurement is not None and measurement.histograms == {}
    assert tracker.collect() is None
    tracker.close()
    tracker.arm()
    optimizer.step()
    assert tracker.collect() is None  # hooks removed


def test_group_spanning_param_groups_uses_per_entry_learning_rates(batch):
    """The bias of module 3 joins its channel's group but sits in a param group with its own lr."""
    model = bn_net()
    bias = model[3].bias
    rest = [p for p in model.parameters() if p is not bias]
    optimizer = torch.optim.SGD([{"params": rest, "lr": 0.1}, {"params": [bias], "lr": 0.02}])
    tracker = SphereTracker(find_invariant_groups(model, batch[0]), [optimizer])
    x, y = batch
    tracker.arm(histograms=True)
    F.cross_entropy(model(x), y).backward()
    x0 = group_rows(model, "3", lambda t: t)
    optimizer.step()
    lr = torch.tensor([0.1] * (x0.shape[1] - 1) + [0.02], dtype=torch.float64)
    want = reference.group_metrics(
        x0, group_rows(model, "3", lambda t: t), group_rows(model, "3", lambda t: t.grad), lr
    )
    measurement = tracker.collect()
    torch.testing.assert_close(
        measurement.histograms["sphere_hist/effective_lr/3"], want["effective_lr"], rtol=1e-10, atol=0
    )


def test_degenerate_rows_are_skipped_and_counted(batch):
    model = bn_net()
    with torch.no_grad():
        model[0].weight[2] = 0  # zero-norm filter
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    groups = find_invariant_groups(model, batch[0])
    tracker = SphereTracker(groups, [optimizer])
    tracker.arm(histograms=True)
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    model[3].weight.grad[1, 0, 0, 0] = float("inf")  # a non-finite gradient entry: that filter's update is inf
    optimizer.step()
    measurement = tracker.collect()
    assert measurement.scalars["sphere/skipped_groups/all"] == 2
    assert all(math.isfinite(v) for v in measurement.scalars.values())
    assert measurement.histograms["sphere_hist/norm/0"].numel() == 5
    assert measurement.histograms["sphere_hist/norm/3"].numel() == 7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_weights_are_measured_in_float32(dtype, batch):
    """The measurement describes the update actually applied to the 16/32-bit weights, computed in float32."""
    model = bn_net(dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-2)
    x = batch[0].to(dtype)
    tracker = SphereTracker(find_invariant_groups(model, x), [optimizer])
    measurement, captured, _ = captured_step(model, optimizer, (x, batch[1]), tracker, check_step=False)
    assert_matches(measurement, captured, rtol=1e-4, atol=1e-6)


def test_modules_outside_the_optimizers_are_not_tracked(batch):
    model = bn_net()
    groups = find_invariant_groups(model, batch[0])
    optimizer = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("0.")], lr=0.1)
    tracker = SphereTracker(groups, [optimizer])
    assert [g.module_name for g in tracker.groups] == ["3"]
    assert tracker.untracked == {"0": "not stepped by any optimizer"}
    split = [
        torch.optim.SGD([model[3].weight], lr=0.1),
        torch.optim.SGD([p for p in model.parameters() if p is not model[3].weight], lr=0.1),
    ]
    assert "different optimizers" in SphereTracker(groups, split).untracked["3"]


def test_empty_tracker_is_harmless(batch):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = SphereTracker(find_invariant_groups(model, batch[0]), [optimizer])
    tracker.arm()
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    optimizer.step()
    assert tracker.groups == [] and tracker.collect() is None
