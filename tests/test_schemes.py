"""The optimizer registry against torch's own optimizers and closed forms written here (docs/theory.md §2, §7)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_sphere import OptimizerRule, SphereTracker, find_invariant_groups, register_optimizer
from lightning_sphere.correction.adam import AdamRewrite
from lightning_sphere.correction.adamg import AdamGRewrite
from lightning_sphere.correction.momentum import MomentumRewrite
from lightning_sphere.optimizers.adam import adam_moments
from lightning_sphere.optimizers.modes import rewrite_for, unsupported
from lightning_sphere.optimizers.registry import MEASURED, OPTIMIZERS, rule_of
from tests import reference
from tests.conftest import DECOUPLED_ADAM, bn_net


def adam_by_hand(grads, lr, betas, eps, weight_decay, decoupled, amsgrad, x0):
    """Adam's recurrence in float64 from the gradient sequence: the final a = m̂, b = √v̂ + ε and weights."""
    beta1, beta2 = betas
    x, m, v, v_max = x0.clone(), torch.zeros_like(x0), torch.zeros_like(x0), torch.zeros_like(x0)
    for t, g in enumerate(grads, start=1):
        if decoupled:
            x = x * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * x
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        v_max = torch.maximum(v_max, v)
        a = m / (1 - beta1**t)
        b = ((v_max if amsgrad else v) / (1 - beta2**t)).sqrt() + eps
        x = x - lr * a / b
    return a, b, x


@pytest.mark.parametrize(
    ("cls", "kwargs", "decoupled"),
    [
        (torch.optim.Adam, {"weight_decay": 0.1}, False),
        pytest.param(
            torch.optim.Adam, {"weight_decay": 0.1, "decoupled_weight_decay": True}, True, marks=DECOUPLED_ADAM
        ),
        (torch.optim.AdamW, {"weight_decay": 0.1}, True),
        (torch.optim.AdamW, {"weight_decay": 0.1, "amsgrad": True}, True),
        (torch.optim.Adam, {"foreach": False, "betas": (0.5, 0.9)}, False),
    ],
)
def test_adam_moments_are_the_a_and_b_of_the_step_torch_took(cls, kwargs, decoupled):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    grads = [torch.randn(4, 5, generator=gen, dtype=torch.float64) for _ in range(6)]
    p = torch.nn.Parameter(x0.clone())
    opt = cls([p], lr=0.05, eps=1e-3, **kwargs)
    rule = rule_of(opt)
    assert rule.moments(opt.state[p], opt.param_groups[0]) is None  # never stepped
    for g in grads:
        p.grad = g.clone()
        before = p.detach().clone()
        opt.step()
    group = opt.param_groups[0]
    a, b, x = adam_by_hand(grads, 0.05, group["betas"], 1e-3, 0.1 if "weight_decay" in kwargs else 0, decoupled,
                           group["amsgrad"], x0)  # fmt: skip
    moments = rule.moments(opt.state[p], group)
    got_a = moments.exp_avg * moments.inv_bias1
    got_b = moments.exp_avg_sq.sqrt() * moments.inv_sqrt_bias2 + group["eps"]
    torch.testing.assert_close(got_a, a, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got_b, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(p.detach(), x, rtol=1e-12, atol=1e-14)
    # The last step, undone from the rule's reading: x_k = (x_{k+1} + η a ⊘ b) / decay_factor.
    assert rule.decoupled_decay(group) is decoupled
    undone = (p.detach() + group["lr"] * got_a / got_b) / rule.decay_factor(group)
    torch.testing.assert_close(undone, before, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-3), math.acos(1 - 1e-4)),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3), math.sqrt(2e-4 / 1.9)),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5, weight_decay=1e-3), math.sqrt(1e-4 / 1.9)),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3), None),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), None),
        (lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05, betas=(0.8, 0.99)), math.sqrt(1e-4 * 0.2 / 1.8)),
        pytest.param(
            lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=0.05, decoupled_weight_decay=True),
            math.sqrt(1e-5 / 1.9),
            marks=DECOUPLED_ADAM,
        ),
        (lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=0.05), None),  # L2 decay is rescaled by b
        (
            lambda p: torch.optim.AdamW(p, lr=torch.tensor(1e-3, dtype=torch.float64), weight_decay=0.05),
            math.sqrt(1e-5 / 1.9),
        ),
        (lambda p: torch.optim.RMSprop(p, lr=1e-3, weight_decay=0.05), None),
    ],
)
def test_equilibrium_of_each_optimizer(make, expected):
    opt = make([torch.nn.Parameter(torch.zeros(2))])
    got = rule_of(opt).equilibrium(opt.param_groups[0])
    assert got == (None if expected is None else pytest.approx(expected, rel=1e-12))


def test_only_exact_classes_are_mapped():
    class Subclassed(torch.optim.Adam):
        pass

    p = [torch.nn.Parameter(torch.zeros(2))]
    assert rule_of(torch.optim.Adam(p)).formula and rule_of(torch.optim.Adam(p)).adaptive
    assert not rule_of(torch.optim.SGD(p)).adaptive
    for opt in (Subclassed(p), torch.optim.RMSprop(p)):
        assert rule_of(opt) is MEASURED and not MEASURED.formula and not MEASURED.adaptive


@pytest.mark.parametrize(
    ("make", "mode", "algorithm", "refusal"),
    [
        (lambda p: torch.optim.Adam(p), "srt", AdamRewrite, None),
        (lambda p: torch.optim.AdamW(p), "s", AdamRewrite, None),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "rt", MomentumRewrite, None),
        (lambda p: torch.optim.SGD(p, lr=0.1), "srt", AdamGRewrite, None),
        (lambda p: torch.optim.SGD(p, lr=0.1), "rt", None, "no meaning for SGD without momentum"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "s", None, "no meaning for SGD with momentum"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), "srt", None, r"nesterov=True"),
        (lambda p: torch.optim.Adam(p, amsgrad=True), "srt", None, r"Adam\(amsgrad=True\)"),
        (lambda p: torch.optim.AdamW(p, maximize=True), "srt", None, r"AdamW\(maximize=True\)"),
        (lambda p: torch.optim.RMSprop(p), "srt", None, "RMSprop has no spherical form here; supported: Adam"),
    ],
)
def test_which_rewrite_applies_and_what_is_refused(make, mode, algorithm, refusal):
    opt = make([torch.nn.Parameter(torch.zeros(2))])
    if refusal is None:
        assert rewrite_for(opt, opt.param_groups[0], mode) is algorithm
        assert unsupported(opt, mode) is None
    else:
        with pytest.raises(ValueError, match=refusal):
            rewrite_for(opt, opt.param_groups[0], mode)
        assert unsupported(opt, mode) is not None


class PlainAdam(torch.optim.Adam):
    """A user's optimizer class: unknown to the registry until registered."""


def test_a_registered_optimizer_gets_the_closed_form_effective_lr(monkeypatch, batch):
    model = bn_net()
    x, y = batch
    groups = find_invariant_groups(model, x)
    opt = PlainAdam(model.parameters(), lr=1e-2)
    assert rule_of(opt) is MEASURED
    monkeypatch.setitem(OPTIMIZERS, PlainAdam, MEASURED)  # so that the entry is removed after the test
    register_optimizer(PlainAdam, OptimizerRule("PlainAdam", moments=adam_moments))
    tracker = SphereTracker(groups, [opt])
    for _ in range(2):  # the second step has Adam state before and after
        tracker.arm()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        layer = model[0]
        before = reference.rows(layer.weight)
        opt.step()
    st = opt.state[layer.weight]
    beta1, beta2 = opt.param_groups[0]["betas"]
    a = reference.rows(st["exp_avg"]) / (1 - beta1**2)
    b = (reference.rows(st["exp_avg_sq"]) / (1 - beta2**2)).sqrt() + 1e-8
    want = reference.group_metrics(before, reference.rows(layer.weight), reference.rows(layer.weight.grad), 1e-2, a, b)
    got = tracker.collect().scalars
    assert got["sphere/effective_lr/0"] == pytest.approx(reference.summarize(want["effective_lr"], "median"), rel=1e-5)
    assert got["sphere/deformation_cos/0"] == pytest.approx(
        reference.summarize(want["deformation_cos"], "mean"), rel=1e-5
    )
