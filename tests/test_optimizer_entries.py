"""Issue 20: the registry entries of Muon, Lion, Adafactor, schedule-free and Prodigy (docs/theory.md §8).

Each closed form is checked against a float64 capture of x_k, x_{k+1} (and the optimizer's own state) on real
steps of the optimizer, in a plain loop with the tracker measuring every step; each filter ratio against the
explicit sums over its coefficients; each equilibrium (``slow``) against a simulation whose gradient stays noise
(fresh random inputs and labels every step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_sphere import SphereMonitor, SphereTracker, find_invariant_groups
from lightning_sphere.optimizers import (
    angular_update_equilibrium,
    filtered_update_equilibrium,
    muon_filter_ratio,
    register_muon,
    rule_of,
    sign_filter_ratio,
    unsupported,
)
from tests import reference
from tests.conftest import MUON
from tests.lightning_helpers import Net, fit

STEPS = 5


# --------------------------------------------------------------------------------------------- the harness


def model(norm: str, inputs: int = 16, hidden: int = 32) -> nn.Sequential:
    """Bias-free Linear → a normalization without parameters → ReLU → bias-free Linear head, float64.
    ``"batch"``: one invariant group per row of the hidden weight; ``"layer"``: the whole weight is one group."""
    layer = nn.BatchNorm1d(hidden, affine=False) if norm == "batch" else nn.LayerNorm(hidden, elementwise_affine=False)
    return nn.Sequential(
        nn.Linear(inputs, hidden, bias=False), layer, nn.ReLU(), nn.Linear(hidden, 10, bias=False)
    ).double()


def captured_run(
    net: nn.Sequential,
    optimizer: torch.optim.Optimizer,
    steps: int = STEPS,
    read: Callable[..., Any] | None = None,
    learnable: bool = False,
) -> list[tuple[dict[str, Any], dict[str, float]]]:
    """``steps`` steps on random data with the tracker measuring each: per step, float64 rows of the hidden
    weight before and after (``x0``, ``x1``), its gradient, the param group as it was before the step, what
    ``read(optimizer, weight, before)`` takes from the optimizer after it, and the logged scalars. Labels are
    random, or with ``learnable`` those of a fixed random linear teacher (a gradient that keeps its direction)."""
    weight = net[0].weight
    gen = torch.Generator().manual_seed(int(torch.randint(2**31 - 1, ())))
    teacher = torch.randn(net[0].in_features, 10, generator=gen, dtype=torch.float64) if learnable else None
    tracker = SphereTracker(
        find_invariant_groups(net, torch.randn(8, net[0].in_features, dtype=torch.float64)), [optimizer]
    )
    assert [g.module_name for g in tracker.groups] == ["0"], tracker.summary()
    out = []
    for _ in range(steps):
        x = torch.randn(32, net[0].in_features, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 10, (32,), generator=gen) if teacher is None else (x @ teacher).argmax(1)
        tracker.arm()
        F.cross_entropy(net(x), y).backward()
        group = next(g for g in optimizer.param_groups if any(p is weight for p in g["params"]))
        before = {k: v for k, v in group.items() if k != "params"}
        record = {"x0": reference.rows(weight), "grad": reference.rows(weight.grad), "before": before}
        optimizer.step()
        optimizer.zero_grad()
        record["x1"] = reference.rows(weight)
        if read is not None:
            record.update(read(optimizer, weight, before))
        measurement = tracker.collect()
        assert measurement is not None
        out.append((record, measurement.scalars))
    tracker.close()
    return out


def logged(scalars: dict[str, float], metric: str) -> float:
    return scalars[f"sphere/{metric}/0"]


# ------------------------------------------------------------------------------------------ filter ratios


def ratio_of(coefficients: list[float]) -> float:
    return sum(c * c for c in coefficients) / sum(coefficients) ** 2


@pytest.mark.parametrize("mu", [0.0, 0.5, 0.9, 0.95])
@pytest.mark.parametrize("nesterov", [False, True])
def test_muon_filter_ratio_is_the_ratio_of_its_coefficients(mu, nesterov):
    """torch's Muon: B_t = μB_{t−1} + (1 − μ)g_t; U_t = B_t, or (1 − μ)g_t + μB_t with Nesterov. The coefficients
    of g_{t−j} in U_t, summed explicitly (4,000 lags)."""
    buffer = [(1 - mu) * mu**j for j in range(4000)]
    coefficients = [(1 - mu) * (j == 0) + mu * b for j, b in enumerate(buffer)] if nesterov else buffer
    assert muon_filter_ratio(mu, nesterov) == pytest.approx(ratio_of(coefficients), rel=1e-12)


def test_adamw_is_the_filtered_equilibrium_of_its_ema():
    for beta1 in (0.0, 0.9, 0.99):
        expected = angular_update_equilibrium("adamw", 1e-2, 0.1, beta1)
        assert filtered_update_equilibrium(1e-3, (1 - beta1) / (1 + beta1)) == pytest.approx(expected, rel=1e-12)
    assert filtered_update_equilibrium(0.0, 0.5) is None and filtered_update_equilibrium(1.0, 0.5) is None


@pytest.mark.parametrize(("beta1", "beta2"), [(0.9, 0.99), (0.95, 0.98), (0.9, 0.9), (0.0, 0.99), (0.9, 0.0)])
def test_sign_filter_ratio_sums_the_correlations_of_successive_signs(beta1, beta2):
    """Lion's c_t = Σ_j c_j g_{t−j}, c_0 = 1 − β1, c_j = β1(1 − β2)β2^{j−1}: for white Gaussian gradients the
    lag-k correlation of c is ρ_k = Σ_j c_j c_{j+k} / Σ_j c_j², that of the signs (2/π) arcsin ρ_k (Sheppard), and
    F = Σ over all lags = 1 + 2 Σ_{k≥1} (2/π) arcsin ρ_k, summed here from the coefficients (6,000 of them)."""
    n = 6000
    c = torch.tensor([1 - beta1] + [beta1 * (1 - beta2) * beta2 ** (j - 1) for j in range(1, n)], dtype=torch.float64)
    energy = (c * c).sum()
    lags = torch.stack([(c[: n - k] * c[k:]).sum() for k in range(1, 3000)]) / energy
    total = 1 + 4 / math.pi * torch.asin(lags.clamp(max=1)).sum()
    assert sign_filter_ratio(beta1, beta2) == pytest.approx(1 / float(total), rel=1e-9)


def test_sheppard_formula_holds_for_sampled_signs():
    """The one fact of probability the Lion ratio rests on, sampled: E[sign(a) sign(b)] = (2/π) arcsin ρ for jointly
    Gaussian a, b of correlation ρ."""
    gen = torch.Generator().manual_seed(int(torch.randint(2**31 - 1, ())))
    a, noise = torch.randn(2, 400_000, generator=gen, dtype=torch.float64)
    for rho in (0.2, 0.6, 0.9):
        b = rho * a + math.sqrt(1 - rho**2) * noise
        assert float((a.sign() * b.sign()).mean()) == pytest.approx(2 / math.pi * math.asin(rho), abs=6e-3)


def test_kosson_value_is_the_linear_limit_of_lion():
    """Kosson et al.'s √(π/2)·√(2ηλ)·‖c‖ is the equilibrium with every lag's sign correlation taken as (2/π)ρ_k,
    lag 0 included: F = (2/π)/‖c‖² (Σc = 1). The arcsin's curvature and the lag-0 term move F by 1.5% at Lion's
    default betas (0.9, 0.99), 6% at (0.95, 0.98), 10% at (0.9, 0.9)."""
    for beta1, beta2 in ((0.9, 0.99), (0.95, 0.98)):
        energy = (1 - beta1) ** 2 + beta1**2 * (1 - beta2) / (1 + beta2)
        kosson = math.sqrt(math.pi / 2) * math.sqrt(2e-3) * math.sqrt(energy)
        ours = filtered_update_equilibrium(1e-3, sign_filter_ratio(beta1, beta2))
        assert ours == pytest.approx(kosson, rel=0.08) and ours != pytest.approx(kosson, rel=1e-3)


# ------------------------------------------------------------------------------------------------ the rules


def test_rules_of_other_packages_are_found_by_their_path():
    lion_pytorch = pytest.importorskip("lion_pytorch")
    schedulefree = pytest.importorskip("schedulefree")
    prodigyopt = pytest.importorskip("prodigyopt")
    params = [nn.Parameter(torch.randn(4, 3))]
    assert rule_of(lion_pytorch.Lion(params)).name == "Lion"
    assert rule_of(schedulefree.AdamWScheduleFree(params)).name == "AdamWScheduleFree"
    assert rule_of(schedulefree.SGDScheduleFree(params)).name == "SGDScheduleFree"
    assert rule_of(prodigyopt.Prodigy(params)).name == "Prodigy"
    if hasattr(torch.optim, "Muon"):  # torch >= 2.9
        assert rule_of(torch.optim.Muon(params)).name == "Muon"
    assert rule_of(torch.optim.Adafactor(params)).name == "Adafactor"

    class MyLion(lion_pytorch.Lion):  # exact classes only: a subclass may step differently
        pass

    assert rule_of(MyLion(params)).name == "other"


@pytest.mark.parametrize(
    ("make", "name"),
    [
        pytest.param(lambda p: torch.optim.Muon(p), "torch.optim.Muon", marks=MUON),
        (lambda p: torch.optim.Adafactor(p), "torch.optim.Adafactor"),
        (lambda p: pytest.importorskip("lion_pytorch").Lion(p), "lion_pytorch.Lion"),
        (lambda p: pytest.importorskip("prodigyopt").Prodigy(p), "prodigyopt.Prodigy"),
    ],
)
@pytest.mark.parametrize("mode", ["srt", "s", "rt"])
def test_a_refused_correction_names_the_optimizer(make, name, mode):
    """With Muon next to AdamW in one run, the message must say which optimizer has no spherical form."""
    message = unsupported(make([nn.Parameter(torch.randn(4, 3))]), mode)
    assert message is not None and message.startswith(f"{name} has no spherical form here; supported: Adam and AdamW")


# --------------------------------------------------------------------------------------------------- Muon


def rms_singular_value(record: dict[str, Any], eta_lambda: float, eta_s: float) -> float:
    """The RMS singular value of the orthogonalized update O = (x_{k+1} − (1 − ηλ) x_k) / (η s), from the capture."""
    update = (record["x1"] - (1 - eta_lambda) * record["x0"]) / eta_s
    sigma = torch.linalg.svdvals(update)
    return float(sigma.square().mean().sqrt())


@pytest.mark.parametrize("norm", ["batch", "layer"])
@pytest.mark.parametrize(("inputs", "adjust"), [(16, "original"), (64, "original"), (16, "match_rms_adamw")])
@MUON
def test_muon_update_scale_is_the_rms_singular_value_of_its_update(norm, inputs, adjust):
    """For a 32 × n weight, per row (BatchNorm) or whole (LayerNorm): the logged ``update_scale`` (RMS over rows for
    rows) is the RMS singular value of the update Muon applied, the SVD of the captured step less its decay
    (η s with torch's adjustment s: √max(1, A/B), or 0.2√max(A, B)); Newton–Schulz leaves it near, not at, 1."""
    net = model(norm, inputs)
    lr, wd = 0.02, 0.1
    optimizer = torch.optim.Muon(net.parameters(), lr=lr, weight_decay=wd, adjust_lr_fn=adjust)
    rows, columns = 32, inputs
    s = math.sqrt(max(1, rows / columns)) if adjust == "original" else 0.2 * math.sqrt(max(rows, columns))
    for record, scalars in captured_run(net, optimizer):
        sigma = rms_singular_value(record, lr * wd, lr * s)
        assert logged(scalars, "update_scale") == pytest.approx(sigma, rel=1e-9)
        assert 0.6 < sigma < 1.1  # approximately orthogonal (5 quintic iterations)
        assert "sphere/effective_lr/0" in scalars  # the measured one
        predicted = math.sqrt(2 * lr * wd * muon_filter_ratio(0.95, True))
        assert logged(scalars, "angular_update_equilibrium") == pytest.approx(predicted, rel=1e-12)


@MUON
def test_muon_rows_against_the_reference():
    """Per row of a 32 × 16 weight under BatchNorm: each row's ‖Δ_i + ηλ x_i‖ over η s √(B/A) (an orthogonal
    matrix's mean row norm), through the package's reduction, and the step's other metrics."""
    net = model("batch")
    lr, wd = 0.05, 0.2
    optimizer = torch.optim.Muon(net.parameters(), lr=lr, weight_decay=wd, nesterov=False, momentum=0.8)
    for record, scalars in captured_run(net, optimizer):
        want = reference.group_metrics(
            record["x0"], record["x1"], record["grad"], lr, measured=True, decay=lr * wd,
            length=lr * math.sqrt(2) * math.sqrt(16 / 32),
        )  # fmt: skip
        for metric in ("update_scale", "angular_update", "tangential_update", "effective_lr"):
            value = reference.summarize(want[metric], reference.REDUCE[metric])
            assert logged(scalars, metric) == pytest.approx(value, rel=1e-9), metric
        predicted = math.sqrt(2 * lr * wd * (1 - 0.8) / (1 + 0.8))
        assert logged(scalars, "angular_update_equilibrium") == pytest.approx(predicted, rel=1e-12)


def test_register_muon_reads_another_implementation():
    """One call registers another Muon: its own momentum name, no Nesterov, its own lr adjustment."""

    class OtherMuon(torch.optim.Optimizer):
        """Momentum `beta`, orthogonalization by an exact polar factor, update scaled by `scale`."""

        def __init__(self, params: Any, lr: float, beta: float, weight_decay: float, scale: float) -> None:
            super().__init__(params, dict(lr=lr, beta=beta, weight_decay=weight_decay, scale=scale))

        @torch.no_grad()
        def step(self, closure: Any = None) -> None:
            for group in self.param_groups:
                for p in group["params"]:
                    buf = self.state[p].setdefault("buf", torch.zeros_like(p))
                    buf.mul_(group["beta"]).add_(p.grad)
                    u, _, vh = torch.linalg.svd(buf, full_matrices=False)
                    p.mul_(1 - group["lr"] * group["weight_decay"]).add_(u @ vh, alpha=-group["lr"] * group["scale"])

    register_muon(OtherMuon, momentum=lambda g: g["beta"], nesterov=lambda g: False, lr_ratio=lambda g, s: g["scale"])
    net = model("layer")
    optimizer = OtherMuon(net.parameters(), lr=0.01, beta=0.9, weight_decay=0.1, scale=3.0)
    for record, scalars in captured_run(net, optimizer):
        # the exact polar factor of a 32 × 16 matrix has 16 unit singular values
        assert rms_singular_value(record, 1e-3, 0.03) == pytest.approx(1, rel=1e-9)
        assert logged(scalars, "update_scale") == pytest.approx(1, rel=1e-9)
        # EMA-less momentum B ← βB + g: the same ratio (1 − β)/(1 + β) as plain Muon's
        assert logged(scalars, "angular_update_equilibrium") == pytest.approx(math.sqrt(2e-3 * 0.1 / 1.9), rel=1e-12)


class ClippedMuon(getattr(torch.optim, "Muon", torch.optim.SGD)):  # type: ignore[misc]  # Muon: torch >= 2.9
    """deepspeedai/DeepSpeed#7713's bug, reproduced: a clipping applied to Muon's orthogonalized update, to a norm
    of at most ``clip`` per weight, whatever its width."""

    def __init__(self, params: Any, clip: float, **options: Any) -> None:
        super().__init__(params, **options)
        self.clip = clip

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        group = self.param_groups[0]
        before = [p.clone() for p in group["params"]]
        super().step(closure)
        decay = 1 - group["lr"] * group["weight_decay"]
        for p, x0 in zip(group["params"], before, strict=True):
            update = p - decay * x0
            p.copy_(decay * x0 + update * (self.clip / update.norm()).clamp(max=1))


@MUON
def test_a_clipped_orthogonalized_update_shows_in_update_scale():
    """The clipped update has the same norm at every width, while Muon's RMS-matched update grows as 0.2√(AB): the
    logged ``update_scale`` of each layer is clip / (η · 0.2√(AB)) (a fraction that halves as the width
    quadruples), where an unclipped Muon reads 0.85–0.93."""
    register_muon(ClippedMuon)
    lr, clip = 0.02, 0.05
    for width in (16, 64, 256):
        net = model("layer", inputs=width)
        optimizer = ClippedMuon(net.parameters(), clip, lr=lr, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
        for record, scalars in captured_run(net, optimizer, steps=2):
            assert float((record["x1"] - (1 - lr * 0.1) * record["x0"]).norm()) == pytest.approx(clip, rel=1e-9)
            expected = clip / (lr * 0.2 * math.sqrt(32 * width))
            assert logged(scalars, "update_scale") == pytest.approx(expected, rel=1e-9)
            assert expected < 0.6


# --------------------------------------------------------------------------------------------------- Lion


@pytest.mark.parametrize("decoupled", [False, True])
def test_lion_moves_each_group_by_lr_sqrt_d(decoupled):
    """lion-pytorch: x ← (1 − ηλ') x − η sign(c), λ' = λ or, with ``decoupled_weight_decay``, λ/η₀. Every row of 16
    entries moves by η√16 once the decay is taken out: ``update_scale`` is 1 to float64 round-off only if both the
    length and the decay the entry reads are right; the equilibrium uses λ'."""
    lion_pytorch = pytest.importorskip("lion_pytorch")
    net = model("batch")
    lr, wd = 1e-3, 0.5 if decoupled else 0.1
    optimizer = lion_pytorch.Lion(net.parameters(), lr=lr, weight_decay=wd, decoupled_weight_decay=decoupled)
    rate = wd / lr if decoupled else wd  # per unit of η
    for record, scalars in captured_run(net, optimizer):
        update = record["x1"] - (1 - lr * rate) * record["x0"]
        assert torch.allclose(update.abs(), torch.full_like(update, lr), rtol=1e-9, atol=0)  # sign: ±η each
        assert logged(scalars, "update_scale") == pytest.approx(1, rel=1e-9)
        predicted = math.sqrt(2 * lr * rate * sign_filter_ratio(0.9, 0.99))
        assert logged(scalars, "angular_update_equilibrium") == pytest.approx(predicted, rel=1e-12)


# ---------------------------------------------------------------------------------------------- Adafactor


@pytest.mark.parametrize("d", [1.0, 2.0])
def test_adafactor_update_is_bounded_by_its_relative_step(d):
    """torch's Adafactor on a whole-weight group: ‖Δ + ηλ x_k‖ ≤ min(η, 1/√t) · d · ‖x_k‖, with equality while the
    update clipping acts (at d = 1, on the first step at least: seeds 0–2 clip there, then on 1–3 of the next 7).
    ``update_scale`` is that ratio, from the capture."""
    net = model("layer")
    lr, wd = 1e-2, 1e-2
    optimizer = torch.optim.Adafactor(net.parameters(), lr=lr, weight_decay=wd, d=d)
    ratios = []
    for t, (record, scalars) in enumerate(captured_run(net, optimizer, steps=8), start=1):
        bound = min(lr, 1 / math.sqrt(t)) * d * float(record["x0"].norm())
        ratios.append(float((record["x1"] - (1 - lr * wd) * record["x0"]).norm()) / bound)
        assert logged(scalars, "update_scale") == pytest.approx(ratios[-1], rel=1e-9)
        assert "sphere/angular_update_equilibrium/0" not in scalars  # a relative step: no §7 equilibrium
    assert max(ratios) <= 1 + 1e-9
    if d == 1:
        assert max(ratios) == pytest.approx(1, rel=1e-9)


def test_adafactor_rows_get_no_update_scale():
    """The clipping acts on the whole tensor: a group of some of its rows has no bound of its own (not logged)."""
    net = model("batch")
    for _, scalars in captured_run(net, torch.optim.Adafactor(net.parameters()), steps=2):
        assert "sphere/update_scale/0" not in scalars and "sphere/angular_update/0" in scalars


# ------------------------------------------------------------------------------------------- schedule-free


def test_schedule_free_logs_the_held_weights_and_nothing_undefined():
    """The step measured is that of y, the weights the model holds (the capture's x_k, x_{k+1}); no equilibrium, no
    update length, no closed-form effective learning rate."""
    schedulefree = pytest.importorskip("schedulefree")
    net = model("batch")
    optimizer = schedulefree.AdamWScheduleFree(net.parameters(), lr=1e-2, weight_decay=1e-2, warmup_steps=0)
    optimizer.train()
    for record, scalars in captured_run(net, optimizer, steps=3):
        want = reference.group_metrics(record["x0"], record["x1"], record["grad"], 1e-2, measured=True)
        for metric in ("angular_update", "effective_lr", "direction_cos"):
            value = reference.summarize(want[metric], reference.REDUCE[metric])
            assert logged(scalars, metric) == pytest.approx(value, rel=1e-9)
        assert not any("equilibrium" in k or "update_scale" in k for k in scalars)


@pytest.mark.parametrize("name", ["AdamWScheduleFree", "SGDScheduleFree"])
def test_schedule_free_refuses_the_correction(name, tmp_path):
    schedulefree = pytest.importorskip("schedulefree")
    module = Net(optimizer=lambda params: getattr(schedulefree, name)(params, lr=1e-2))
    with pytest.raises(MisconfigurationException, match=r"spherical_correction=\.\.\.\): .*interpolation y"):
        fit(module, tmp_path, [SphereMonitor(spherical_correction=True)], max_steps=1)


# -------------------------------------------------------------------------------------------------- Prodigy


def prodigy_state(optimizer: Any, weight: Tensor, before: dict[str, Any]) -> dict[str, Any]:
    """From Prodigy's own state after its step (written from prodigyopt's ``step``): the decay dlr λ it applied,
    dlr = d η c₂/c₁ with d as it was before the step, c₁ = 1 − β1^t, c₂ = √(1 − β2^t) with ``use_bias_correction``
    (else 1); its learning rate as Adam's, d η; and a = m/(d' c₁), b = √v/(d' c₂) + ε/c₂, d' the moved d."""
    beta1, beta2 = before["betas"]
    t = before["k"] + 1
    c1, c2 = (1 - beta1**t, math.sqrt(1 - beta2**t)) if before["use_bias_correction"] else (1.0, 1.0)
    state, d = optimizer.state[weight], optimizer.param_groups[0]["d"]
    return {
        "lr": before["d"] * before["lr"],
        "decay": before["d"] * before["lr"] * c2 / c1 * before["weight_decay"],
        "a": reference.rows(state["exp_avg"]) / (d * c1),
        "b": reference.rows(state["exp_avg_sq"]).sqrt() / (d * c2) + before["eps"] / c2,
    }


@pytest.mark.parametrize("bias_correction", [False, True])
def test_prodigy_metrics_use_the_step_size_it_took(bias_correction):
    """Prodigy's effective learning rate (§3 with a, b from its state and its learning rate d η), Adam's
    diagnostics and the AdamW equilibrium with the decay it applied, against the capture, on a learnable task where
    d grows several times over (inside the steps: read from the group as the step left it, every value here would
    be wrong)."""
    prodigyopt = pytest.importorskip("prodigyopt")
    net = model("batch")
    optimizer = prodigyopt.Prodigy(net.parameters(), lr=1.0, weight_decay=0.1, use_bias_correction=bias_correction)
    steps = captured_run(net, optimizer, steps=12, read=prodigy_state, learnable=True)
    for record, _ in steps:  # x_{k+1} is Adam's step with lr d η, a, b, and the decay: the capture reads it right
        step = record["x0"] * (1 - record["decay"]) - record["lr"] * record["a"] / record["b"]
        assert torch.allclose(step, record["x1"], rtol=1e-12, atol=1e-15)
    for record, scalars in steps:
        want = reference.group_metrics(
            record["x0"], record["x1"], record["grad"], record["lr"], a=record["a"], b=record["b"]
        )
        for metric in ("effective_lr", "angular_update", "deformation_cos", "momentum_radial", "direction_cos"):
            value = reference.summarize(want[metric], reference.REDUCE[metric])
            assert logged(scalars, metric) == pytest.approx(value, rel=1e-8, abs=1e-12), metric
        predicted = math.sqrt(2 * record["decay"] * 0.1 / 1.9)  # AdamW's, with the decay the step applied
        assert logged(scalars, "angular_update_equilibrium") == pytest.approx(predicted, rel=1e-12)
    growth = 2 if bias_correction else 10  # 3–5× and 200–700× over seeds 0–4
    assert steps[-1][0]["before"]["d"] > growth * steps[0][0]["before"]["d"]


def test_prodigy_with_frozen_d_is_adam():
    """A functional ground truth: with ``d_coef=0`` Prodigy's d stays d0, and with its bias correction its step is
    torch's Adam's with lr d0 · η (ε negligible in both, which place it differently; Prodigy refuses 0). The two
    runs' closed-form effective learning rates and Adam diagnostics agree: with a = m and b = √v + dε (m and v carry
    d and d²) they would differ by 1/d0 = 1,000, with the bias corrections left in the step size by 1/(1 − β1^t)."""
    prodigyopt = pytest.importorskip("prodigyopt")
    runs = {}
    for name in ("prodigy", "adam"):
        torch.manual_seed(0)  # the same initial weights, and (from the suite's seed below) the same batches
        net = model("batch")
        optimizer = (
            prodigyopt.Prodigy(net.parameters(), lr=0.5, d0=1e-3, d_coef=0.0, eps=1e-30, use_bias_correction=True)
            if name == "prodigy"
            else torch.optim.Adam(net.parameters(), lr=0.5e-3, eps=1e-30)
        )
        with torch.random.fork_rng():
            torch.manual_seed(1)
            runs[name] = captured_run(net, optimizer, steps=4)
    for (record, prodigy), (twin, adam) in zip(runs["prodigy"], runs["adam"], strict=True):
        assert torch.allclose(record["x1"], twin["x1"], rtol=1e-10, atol=0)  # the same step
        for metric in ("effective_lr", "deformation_cos", "momentum_radial", "angular_update"):
            assert logged(prodigy, metric) == pytest.approx(logged(adam, metric), rel=1e-8), metric


def test_prodigy_without_momentum():
    """β1 = 0: no m, so the measured effective learning rate; the equilibrium is AdamW's at β1 = 0, √(2 d η λ)."""
    prodigyopt = pytest.importorskip("prodigyopt")
    net = model("batch")
    optimizer = prodigyopt.Prodigy(net.parameters(), lr=1.0, betas=(0.0, 0.99), weight_decay=0.1)
    for record, scalars in captured_run(net, optimizer, steps=3):
        want = reference.group_metrics(record["x0"], record["x1"], record["grad"], 1.0, measured=True)
        value = reference.summarize(want["effective_lr"], "median")
        assert logged(scalars, "effective_lr") == pytest.approx(value, rel=1e-9)
        assert "sphere/deformation_cos/0" not in scalars
        dlr = record["before"]["d"] * record["before"]["lr"]  # no bias correction by default
        assert logged(scalars, "angular_update_equilibrium") == pytest.approx(math.sqrt(2 * dlr * 0.1), rel=1e-12)


# ------------------------------------------------------------------------------------ equilibria (simulated)


def settle(make: Callable[[nn.Module], torch.optim.Optimizer], inputs: int, steps: int, window: int = 300) -> float:
    """RMS of the logged angular update over the last ``window`` of ``steps`` steps on fresh random inputs and
    labels (the gradient stays noise), float32, rows of a 32 × ``inputs`` weight under BatchNorm."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(int(torch.randint(2**31 - 1, ())))
    torch.manual_seed(int(torch.randint(2**31 - 1, (), generator=gen)))
    net = nn.Sequential(
        nn.Linear(inputs, 32, bias=False), nn.BatchNorm1d(32, affine=False), nn.ReLU(), nn.Linear(32, 10, bias=False)
    )
    optimizer = make(net)
    tracker = SphereTracker(find_invariant_groups(net, torch.randn(64, inputs)), [optimizer])
    measured = []
    for step in range(steps):
        if step >= steps - window:
            tracker.arm()
        x, y = torch.randn(32, inputs, generator=gen), torch.randint(0, 10, (32,), generator=gen)
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if (m := tracker.collect()) is not None:
            measured.append(m.scalars["sphere/angular_update/0"])
            assert m.scalars["sphere/angular_update_equilibrium/0"] == pytest.approx(
                m.scalars["sphere/angular_update_equilibrium/all"]
            )
            equilibrium = m.scalars["sphere/angular_update_equilibrium/0"]
    tracker.close()
    assert len(measured) == window
    return math.sqrt(sum(v * v for v in measured) / window) / equilibrium


@pytest.mark.slow
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@MUON
def test_muon_settles_at_its_equilibrium(nesterov, adjust):
    """ηλ = 1e-3 (settling in ~500 steps), μ = 0.95: the measured angle over the logged equilibrium
    √(2ηλ Σc²/(Σc)²). With Nesterov the AdamW value √(2ηλ(1 − μ)/(1 + μ)) would be 7–11% low."""

    def make(net: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Muon(net.parameters(), lr=0.02, weight_decay=0.05, nesterov=nesterov, adjust_lr_fn=adjust)

    assert settle(make, 16, 1500) == pytest.approx(1, rel=0.05)


@pytest.mark.slow
@pytest.mark.parametrize(("beta1", "beta2"), [(0.9, 0.99), (0.95, 0.98)])
def test_lion_settles_at_its_equilibrium(beta1, beta2):
    """Rows of 64 entries (the arcsin value holds as d grows; at d = 16 the angle reads a few percent under it),
    ηλ = 1e-3."""
    lion_pytorch = pytest.importorskip("lion_pytorch")

    def make(net: nn.Module) -> torch.optim.Optimizer:
        return lion_pytorch.Lion(net.parameters(), lr=1e-2, betas=(beta1, beta2), weight_decay=0.1)

    assert settle(make, 64, 2500) == pytest.approx(1, rel=0.05)
