import math

import pytest
import torch

from lightning_sphere.measurement.metrics import METRICS, GroupStats, sphere_metrics, valid_groups
from lightning_sphere.optimizers.equilibrium import angular_update_equilibrium
from tests import reference


def dot(p, q):
    return (p * q).sum(1)


def stats_of(x0, x1, g, lr, a=None, b=None, formula=True, equilibrium=float("nan")):
    """GroupStats of explicit rows, as the tracker would assemble them (s = η a⊘b, P = b/η)."""
    m, d = x0.shape
    delta = x1 - x0
    adaptive = a is not None
    if not adaptive:
        a = b = torch.ones_like(x0)
    s, p = lr * a / b, b / lr
    full = lambda v: torch.full((m,), float(v), dtype=x0.dtype)  # noqa: E731
    return GroupStats(
        xx=dot(x0, x0), xd=dot(x0, delta), dd=dot(delta, delta), xg=dot(x0, g), gg=dot(g, g), dg=dot(delta, g),
        pp=dot(p, p), xa=dot(x0, a), aa=dot(a, a), xs=dot(x0, s), ss=dot(s, s), sa=dot(s, a),
        group_size=full(d), formula=full(formula), adaptive=full(adaptive), equilibrium=full(equilibrium),
        decay=full(0), update_length=full(float("nan")), relative_length=full(float("nan")),
    )  # fmt: skip


def random_step(m=5, d=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(m, d, generator=gen, dtype=torch.float64)
    g = torch.randn(m, d, generator=gen, dtype=torch.float64)
    return x0, g, gen


def test_sgd_step_metrics_match_explicit_vectors():
    x0, g, _ = random_step()
    lr, wd = 0.05, 0.01
    x1 = x0 - lr * (g + wd * x0)
    got = sphere_metrics(stats_of(x0, x1, g, lr))
    want = reference.group_metrics(x0, x1, g, lr)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-10, atol=1e-12, msg=name)
    assert got["deformation_cos"].isnan().all() and got["momentum_radial"].isnan().all()


def test_sgd_identities_hold_exactly():
    """§3: radial part −ηλ, η^e = η/(r_k r_{k+1}), sin θ = η^e ‖∇L(u_k)‖ for SGD on any vector."""
    x0, g, _ = random_step(seed=1)
    lr, wd = 0.1, 0.02
    x1 = x0 - lr * (g + wd * x0)
    got = sphere_metrics(stats_of(x0, x1, g, lr))
    r0, r1 = x0.norm(dim=1), x1.norm(dim=1)
    # The update's radial part is −ηλ x_k plus −η⟨g, u⟩: remove the latter to isolate the decay.
    g_radial = (g * x0).sum(1) / r0**2
    torch.testing.assert_close(got["radial_update"] + lr * g_radial, torch.full_like(r0, -lr * wd), rtol=0, atol=1e-15)
    torch.testing.assert_close(got["effective_lr"], lr / (r0 * r1), rtol=1e-13, atol=0)
    torch.testing.assert_close(
        got["angular_update"].sin(), got["effective_lr"] * got["sphere_grad_norm"], rtol=1e-12, atol=0
    )


def test_adam_step_metrics_match_explicit_vectors():
    x0, g, gen = random_step(seed=2)
    a = g + 0.3 * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    b = torch.rand(x0.shape, generator=gen, dtype=torch.float64) + 0.1
    lr = 1e-2
    x1 = x0 - lr * a / b
    got = sphere_metrics(stats_of(x0, x1, g, lr, a, b))
    want = reference.group_metrics(x0, x1, g, lr, a, b)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-10, atol=1e-12, msg=name)
    # sin θ = η^e ‖c⊥‖ with c = r_k a ⊘ (b / rms(b)) (§3), exactly.
    r0 = x0.norm(dim=1, keepdim=True)
    c = r0 * a / (b / (b.norm(dim=1, keepdim=True) / x0.shape[1] ** 0.5))
    c_perp = reference.perp(c, x0 / r0)
    torch.testing.assert_close(
        got["angular_update"].sin(), got["effective_lr"] * c_perp.norm(dim=1), rtol=1e-12, atol=0
    )


def test_measured_effective_lr_for_other_optimizers():
    x0, g, gen = random_step(seed=3)
    x1 = x0 - 0.01 * torch.randn(x0.shape, generator=gen, dtype=torch.float64)  # any update
    got = sphere_metrics(stats_of(x0, x1, g, 1.0, formula=False))
    want = reference.group_metrics(x0, x1, g, 1.0, measured=True)
    torch.testing.assert_close(got["effective_lr"], want["effective_lr"], rtol=1e-10, atol=0)


def test_small_angles_keep_full_precision_in_float32():
    """atan2 of the exact components: float32 acos would be off by 2% at θ = 1e-3 (§3)."""
    d = 64
    x0 = torch.zeros(1, d)
    x0[0, 0] = 1.0
    x1 = x0.clone()
    x1[0, 1] = 3e-4
    got = sphere_metrics(stats_of(x0, x1, torch.zeros_like(x0), 1.0))
    assert got["angular_update"].item() == pytest.approx(math.atan(3e-4), rel=1e-6)


def test_degenerate_groups_are_nan_not_crashes():
    x0, g, _ = random_step(m=4, seed=4)
    x0[0] = 0  # zero-norm row
    x1 = x0 - 0.1 * g
    g[1] = 0  # zero gradient: only gradient metrics are undefined
    x1[2] = x0[2]  # no update: the direction is undefined, the angle is zero
    x1[3, 0] = float("inf")  # non-finite update
    st = stats_of(x0, x1, g, 0.1)
    got = sphere_metrics(st)
    assert valid_groups(st).tolist() == [False, True, True, False]
    for name in METRICS:
        assert got[name][[0, 3]].isnan().all(), name
    assert got["grad_cos"][1].isnan() and got["sphere_grad_norm"][1] == 0 and got["norm"][1].isfinite()
    assert got["angular_update"][2] == 0 and got["direction_cos"][2].isnan()


@pytest.mark.parametrize(
    ("kind", "lr", "wd", "momentum", "dampening", "expected"),
    [
        ("sgd", 0.1, 5e-4, 0.0, 0.0, math.acos(1 - 5e-5)),
        ("sgd", 0.1, 5e-4, 0.9, 0.0, math.sqrt(2 * 5e-5 / 1.9)),
        ("sgd", 0.1, 5e-4, 0.9, 0.5, math.sqrt(2 * 5e-5 * 0.5 / 1.9)),
        ("adamw", 1e-3, 0.05, 0.9, 0.0, math.sqrt(2 * 5e-5 * 0.1 / 1.9)),
        ("sgd", 0.1, 0.0, 0.9, 0.0, None),
        ("adamw", 1e-3, 0.0, 0.9, 0.0, None),
    ],
)
def test_angular_update_equilibrium(kind, lr, wd, momentum, dampening, expected):
    got = angular_update_equilibrium(kind, lr, wd, momentum, dampening)
    assert got == (None if expected is None else pytest.approx(expected, rel=1e-12))


def test_equilibrium_matches_a_simulated_sgd_run():
    """§7: SGD with decay on a group whose Riemannian gradient has a constant norm and a random tangent
    direction (stationary noise): the RMS angular update settles at the predicted value."""
    torch.manual_seed(0)
    lr, wd, d = 0.1, 5e-3, 256
    x = torch.randn(d, dtype=torch.float64)
    x = 2 * x / x.norm()  # near the equilibrium norm (η/2λ)^¼ ≈ 1.8, reached in ~1/(2ηλ) steps
    thetas = []
    for _ in range(4000):
        u = x / x.norm()
        g = torch.randn(d, dtype=torch.float64)
        g = g - (g @ u) * u
        g = g / g.norm() / x.norm()  # ∇L(x) = ∇L(u)/r with ‖∇L(u)‖ = 1
        x1 = x - lr * (g + wd * x)
        thetas.append(math.acos(float(x @ x1 / (x.norm() * x1.norm()))))
        x = x1
    settled = (sum(t * t for t in thetas[-1000:]) / 1000) ** 0.5
    assert settled == pytest.approx(angular_update_equilibrium("sgd", lr, wd), rel=0.05)


def test_group_stats_begin_with_the_kernels_columns_in_their_order():
    """The tracker stacks the kernels' per-group sums and its own four fields into one ``(M, 16)`` tensor, read back
    by position: the two field lists must agree."""
    from lightning_sphere.kernels.products import StepProducts

    assert GroupStats._fields == (
        *StepProducts._fields, "group_size", "formula", "adaptive", "equilibrium", "decay", "update_length",
        "relative_length",
    )  # fmt: skip


def test_the_reference_covers_every_metric_of_the_registry():
    """A metric added to the registry and not to the independent reference would be compared with nothing: the
    suite's comparisons iterate over the reference's metrics. The equilibrium is a formula of hyper-parameters,
    checked on its own (§7)."""
    from tests import reference

    computed = set(reference.REDUCE)
    assert set(METRICS) - {"angular_update_equilibrium"} <= computed
    for name in computed & set(METRICS):
        assert reference.REDUCE[name] == METRICS[name].reduction, name
