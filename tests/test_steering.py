"""Issue 21: the rotational and hyperball modes (docs/theory.md §9) against float64 references written here from
the papers' equations (Kosson et al., arXiv:2305.17212, Algorithm 1; Wen et al., arXiv:2606.16899), on a twin
run: the same model trained by the plain optimizer, whose every step the reference turns into the mode's. The
reference reads only x_k, x_{k+1} and the hyper-parameters, per group as this file defines the groups (rows of
a layer before BatchNorm, a whole layer and its bias before LayerNorm): none of the package's code.

Also: what the monitor logs (the target line, and the measured angular update on it), state in the optimizer's
checkpoint (an exact resume), a zero-initialized group, 16-bit weights, and the refusals.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable
from typing import Any

import lion_pytorch
import prodigyopt
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lightning_fabric.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sphere import Hyperball, Rotational, SphereMonitor, SphereTracker, find_invariant_groups
from tests.conftest import MUON
from tests.lightning_helpers import MemoryLogger, fit

IN, HIDDEN, WIDE, OUT = 12, 16, 24, 5


class Net(nn.Module):
    """fc1 (rows invariant under BatchNorm) → fc2 (whole layer and bias invariant under LayerNorm) → head."""

    def __init__(self, bias: bool = True, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN, HIDDEN, bias=False, dtype=dtype)
        self.bn = nn.BatchNorm1d(HIDDEN, dtype=dtype)
        self.fc2 = nn.Linear(HIDDEN, WIDE, bias=bias, dtype=dtype)
        self.ln = nn.LayerNorm(WIDE, elementwise_affine=False, dtype=dtype)
        self.head = nn.Linear(WIDE, OUT, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.ln(self.fc2(F.relu(self.bn(self.fc1(x)))))))


def groups_of(net: Net) -> list[list[Tensor]]:
    """The invariant groups, as this file defines them: lists of views whose entries form one group."""
    rows = [[net.fc1.weight[i]] for i in range(HIDDEN)]
    whole = [net.fc2.weight] + ([net.fc2.bias] if net.fc2.bias is not None else [])
    return [*rows, whole]


def flat(views: list[Tensor]) -> Tensor:
    return torch.cat([v.detach().reshape(-1) for v in views]).double()


def put(views: list[Tensor], values: Tensor) -> None:
    start = 0
    with torch.no_grad():
        for v in views:
            v.copy_(values[start : start + v.numel()].view_as(v))
            start += v.numel()


# ----------------------------------------------------------------------------------------------- references


class ReferenceRotational:
    """Kosson et al.'s rotational update (their Algorithm 1), per group, in float64, from x_k and the plain step."""

    def __init__(self, beta: float = 0.9, center: bool = True, eps: float = 1e-8) -> None:
        self.beta, self.center, self.eps = beta, center, eps
        self.state: dict[int, dict[str, Any]] = {}

    def __call__(
        self, g: int, x0: Tensor, x1: Tensor, lr: float, decay: float, target: float, coupled: Tensor | float = 0.0
    ) -> Tensor:
        u = ((1 - lr * decay) * x0 - x1) / lr - coupled  # the base update without its weight decay, nor η
        state = self.state.get(g)
        if state is None:  # first step: the radius, and the weights centered at that norm
            radius = x0.norm()
            if self.center:
                x0 = (x0 - x0.mean()) * radius / (x0 - x0.mean()).norm()
            state = self.state[g] = {"radius": radius, "nu": 0.0, "t": 0}
        radius = state["radius"]
        if self.center:
            u = u - u.mean()
        u = u - x0 * (u @ x0) / radius**2
        state["t"] += 1
        state["nu"] = (1 - self.beta) * (u @ u) + self.beta * state["nu"]
        average = math.sqrt(state["nu"] / (1 - self.beta ** state["t"]))
        p = x0 - target * radius * u / (average + self.eps)
        return p * radius / p.norm()


class ReferenceHyperball:
    """x ← R·normalize(x − ηR·normalize(u)), per group, in float64, from x_k and the plain step."""

    def __init__(self, radius: float | None = None) -> None:
        self.radius, self.radii = radius, {}

    def __call__(
        self, g: int, x0: Tensor, x1: Tensor, lr: float, decay: float, target: float, coupled: Tensor | float = 0.0
    ) -> Tensor:
        if x0.norm() == 0:
            return x1  # the plain step, until the group has a norm
        radius = self.radii.setdefault(g, x0.norm() if self.radius is None else torch.tensor(self.radius).double())
        update = (1 - lr * decay) * x0 - x1  # η u: the plain step less its decoupled decay
        p = x0 - lr * radius * update / update.norm()
        return p * radius / p.norm()


# ----------------------------------------------------------------------------------------------- optimizers


def adamw_target(lr: float, decay: float, beta1: float) -> float:
    return math.sqrt(2 * lr * decay * (1 - beta1) / (1 + beta1))


#: name → (make optimizers for a Net, decoupled decay λ of the tracked groups, target η_r for the rotational
#: reference given lr, or None to pass the target explicitly)
CASES: dict[str, tuple[Callable[[Net], list[torch.optim.Optimizer]], float, Callable[[float], float] | None]] = {
    "AdamW": (lambda n: [torch.optim.AdamW(n.parameters(), lr=1e-2, weight_decay=0.1)], 0.1,
              lambda lr: adamw_target(lr, 0.1, 0.9)),
    "SGD-M": (lambda n: [torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)], 0.0,
              lambda lr: math.sqrt(2 * lr * 1e-2 / 1.9)),
    "SGD-Nesterov": (lambda n: [torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                                weight_decay=1e-2)], 0.0, None),
    "SGD-dampening": (lambda n: [torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9, dampening=0.5,
                                                 weight_decay=1e-2)], 0.0, None),
    "Adam": (lambda n: [torch.optim.Adam(n.parameters(), lr=1e-2)], 0.0, None),
    "SGD": (lambda n: [torch.optim.SGD(n.parameters(), lr=0.1)], 0.0, None),
    "SGD-M, no decay": (lambda n: [torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9)], 0.0, None),
    "Lion": (lambda n: [lion_pytorch.Lion(n.parameters(), lr=1e-3, weight_decay=1.0)], 1.0, None),
    "Muon": (lambda n: [torch.optim.Muon([n.fc1.weight, n.fc2.weight], lr=2e-2, weight_decay=0.1),
                        torch.optim.AdamW([n.head.weight, n.head.bias, *n.bn.parameters()], lr=1e-2)], 0.1, None),
    "Prodigy": (lambda n: [prodigyopt.Prodigy(n.parameters(), lr=1.0, weight_decay=1e-2)], 1e-2, None),
}  # fmt: skip
#: cases whose weight decay is coupled into the gradient (refused by the hyperball): (μ, τ, nesterov, λ) of torch's
#: SGD, whose momentum buffer holds the decay's terms besides the gradients; Kosson et al. keep that part apart, and
#: so does the reference: l ← μ l + (1 − τ) λ x_k (λ x_k on the first step, as torch's buffer starts undamped),
#: u = (x_k − x_{k+1})/η − l, or with Nesterov − (λ x_k + μ l)
COUPLED = {
    "SGD-M": (0.9, 0.0, False, 1e-2),
    "SGD-Nesterov": (0.9, 0.0, True, 1e-2),
    "SGD-dampening": (0.9, 0.5, False, 1e-2),
}
#: an explicit target, for the cases the reference does not derive one for
EXPLICIT = 0.02


def lr_in_force(optimizer: torch.optim.Optimizer, before: dict[str, Any]) -> float:
    """η of the step just taken: the group's lr, Prodigy's d·lr (d as it was before the step, with its bias
    correction, written out from prodigyopt's step)."""
    if isinstance(optimizer, prodigyopt.Prodigy):
        beta1, beta2 = before["betas"]
        k = before["k"] + 1
        correction = math.sqrt(1 - beta2**k) / (1 - beta1**k) if before["use_bias_correction"] else 1.0
        return before["d"] * before["lr"] * correction
    return before["lr"]


def decay_in_force(optimizer: torch.optim.Optimizer, lr: float, before: dict[str, Any], decay: float) -> float:
    """λ such that the plain step scales x_k by 1 − η λ (η = :func:`lr_in_force`)."""
    if isinstance(optimizer, lion_pytorch.Lion):
        return decay  # lion-pytorch: p ← p (1 − lr λ)
    if isinstance(optimizer, prodigyopt.Prodigy):
        return before["d"] * before["lr"] * decay / lr  # Prodigy decays by d·lr·λ
    return decay


def batches(steps: int, seed: int, dtype: torch.dtype = torch.float64) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(32, IN, generator=gen, dtype=dtype), torch.randint(0, OUT, (32,), generator=gen))
        for _ in range(steps)
    ]


def train_step(net: Net, optimizers: list[torch.optim.Optimizer], batch: tuple[Tensor, Tensor]) -> None:
    F.cross_entropy(net(batch[0]), batch[1]).backward()
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad()


def twin_run(case: str, mode: Any, reference: Any, steps: int = 12, bias: bool = True, seed: int = 0):
    """The tracked run under ``mode`` and the plain run turned into the mode by ``reference`` step by step; both
    models' tracked weights after every step."""
    make, decay, target_of = CASES[case]
    torch.manual_seed(seed)
    net = Net(bias=bias and case != "Muon")
    twin = copy.deepcopy(net)
    optimizers, twin_optimizers = make(net), make(twin)
    found = find_invariant_groups(net, batches(1, seed + 1)[0][0])
    tracker = SphereTracker(found, optimizers, correction=mode, model=net, warn=lambda m: None)
    assert sorted(e.module_name for e in tracker.groups) == ["fc1", "fc2"]
    got, want, held = [], [], {}
    for batch in batches(steps, seed + 2):
        train_step(net, optimizers, batch)
        main = twin_optimizers[0]
        before = {k: v for k, v in main.param_groups[0].items() if k != "params"}
        x0 = [flat(g) for g in groups_of(twin)]
        train_step(twin, twin_optimizers, batch)
        lr = lr_in_force(main, before)
        lam = decay_in_force(main, lr, before, decay)
        target = target_of(before["lr"]) if target_of is not None else EXPLICIT
        for g, (views, x) in enumerate(zip(groups_of(twin), x0, strict=True)):
            coupled = 0.0
            if case in COUPLED:
                mu, tau, nesterov, l2 = COUPLED[case]
                held[g] = mu * held[g] + (1 - tau) * l2 * x if g in held else l2 * x
                coupled = l2 * x + mu * held[g] if nesterov else held[g]
            put(views, reference(g, x, flat(views), lr, lam, target, coupled))
        got.append(torch.cat([flat(g) for g in groups_of(net)]))
        want.append(torch.cat([flat(g) for g in groups_of(twin)]))
    tracker.close()
    return got, want, tracker


def cases(names):
    """Case names as parameters, each marked with the torch it needs."""
    return [pytest.param(c, marks=MUON) if c == "Muon" else c for c in names]


ROTATIONAL_CASES = cases(c for c in CASES if c not in ("Adam", "SGD", "SGD-M, no decay"))


@pytest.mark.parametrize("case", ROTATIONAL_CASES)
def test_rotational_equals_the_float64_reference(case):
    target = None if CASES[case][2] is not None else EXPLICIT
    got, want, _ = twin_run(case, Rotational(angular_update=target), ReferenceRotational())
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"{case}, step {step}")


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.99])
def test_rotational_options_equal_the_reference(center, beta):
    got, want, _ = twin_run("AdamW", Rotational(update_norm_decay=beta, center=center, eps=1e-3),
                            ReferenceRotational(beta=beta, center=center, eps=1e-3))  # fmt: skip
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", cases(c for c in CASES if c not in COUPLED))
def test_hyperball_equals_the_float64_reference(case):
    got, want, _ = twin_run(case, "hyperball", ReferenceHyperball())
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"{case}, step {step}")


def test_hyperball_with_a_radius_equals_the_reference():
    got, want, _ = twin_run("Adam", Hyperball(radius=2.5), ReferenceHyperball(radius=2.5))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    rows = got[-1][: HIDDEN * IN].view(HIDDEN, IN).norm(dim=1)
    torch.testing.assert_close(rows, torch.full_like(rows, 2.5), rtol=1e-12, atol=0)


def test_the_norms_are_held_and_decay_is_left_out():
    """Both modes hold every group at its first norm, whatever AdamW's decay (which alone would shrink it)."""
    for mode in ("rotational", "hyperball"):
        torch.manual_seed(0)
        net = Net()
        start = [flat(g).norm() for g in groups_of(net)]
        optimizers = [torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=5.0)]
        tracker = SphereTracker(find_invariant_groups(net, batches(1, 1)[0][0]), optimizers, correction=mode)
        for batch in batches(20, 3):
            train_step(net, optimizers, batch)
        tracker.close()
        if mode == "rotational":  # centered once at the first step, at the same norm
            start = [flat(g).norm() for g in groups_of(net)]
        for g, r in zip(groups_of(net), start, strict=True):
            assert flat(g).norm() == pytest.approx(float(r), rel=1e-12), mode
        assert net.head.weight.norm() < 1.0  # the head is not tracked: AdamW's decay acts on it


# ----------------------------------------------------------------------------------------------- the state


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),  # + the decay's momentum
    ],
    ids=["AdamW", "SGD-M"],
)
def test_state_lives_in_the_optimizers_checkpoint_and_resumes_exactly(make):
    """Six steps, a round trip of model and optimizer state dicts through bytes, six more: bit for bit the run that
    never stopped. A radius taken afresh from the resumed weights would differ at round-off; a fresh running mean
    of ‖u_⊥‖² by a lot."""

    def run(mode: Any, stop: int | None) -> Tensor:
        torch.manual_seed(0)
        net = Net(dtype=torch.float32)
        data = batches(12, 5, torch.float32)
        optimizers = [make(net.parameters())]
        tracker = SphereTracker(find_invariant_groups(net, data[0][0]), optimizers, correction=mode)
        for i, batch in enumerate(data):
            if i == stop:
                buffer = io.BytesIO()
                torch.save({"model": net.state_dict(), "optimizer": optimizers[0].state_dict()}, buffer)
                tracker.close()
                buffer.seek(0)
                saved = torch.load(buffer, weights_only=True)
                net = Net(dtype=torch.float32)
                net.load_state_dict(saved["model"])
                optimizers = [make(net.parameters())]
                optimizers[0].load_state_dict(saved["optimizer"])
                tracker = SphereTracker(find_invariant_groups(net, data[0][0]), optimizers, correction=mode)
            train_step(net, optimizers, batch)
        tracker.close()
        return torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    coupled = make([nn.Parameter(torch.zeros(1))]).param_groups[0].get("momentum", 0) > 0  # SGD: hyperball refuses
    for mode in ("rotational",) if coupled else ("rotational", "hyperball"):
        whole, resumed = run(mode, None), run(mode, 6)
        assert torch.equal(whole, resumed), mode


def test_the_state_is_in_the_optimizer_state_under_the_modules_name():
    torch.manual_seed(0)
    net = Net()
    optimizers = [torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)]
    tracker = SphereTracker(find_invariant_groups(net, batches(1, 1)[0][0]), optimizers, correction="hyperball")
    for batch in batches(3, 2):
        train_step(net, optimizers, batch)
    state = optimizers[0].state
    radii = state[net.fc1.weight]["sphere_hyperball:fc1"]
    torch.testing.assert_close(radii[:, 0], net.fc1.weight.detach().norm(dim=1), rtol=1e-12, atol=0)
    whole = torch.cat([net.fc2.weight.detach().reshape(-1), net.fc2.bias.detach()]).norm()
    torch.testing.assert_close(state[net.fc2.weight]["sphere_hyperball:fc2"][:, 0], whole[None], rtol=1e-12, atol=0)
    tracker.close()


def test_a_zero_initialized_group_is_left_to_the_base_optimizer_until_it_has_a_norm():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.fc1.weight[3].zero_()
        net.bn.bias[3] = 0.5  # so that the ReLU passes the gradient of the channel BatchNorm holds at its bias
    twin = copy.deepcopy(net)
    warnings: list[str] = []
    optimizers = [torch.optim.Adam(net.parameters(), lr=1e-2)]
    tracker = SphereTracker(find_invariant_groups(net, batches(1, 1)[0][0]), optimizers, correction="hyperball",
                            warn=warnings.append)  # fmt: skip
    assert any("fc1 has 1 of 16 groups at zero" in w and "until they have a norm" in w for w in warnings), warnings
    reference, twin_optimizer = ReferenceHyperball(), torch.optim.Adam(twin.parameters(), lr=1e-2)
    for batch in batches(6, 2):
        train_step(net, optimizers, batch)
        x0 = [flat(g) for g in groups_of(twin)]
        train_step(twin, [twin_optimizer], batch)
        for g, (views, x) in enumerate(zip(groups_of(twin), x0, strict=True)):
            put(views, reference(g, x, flat(views), 1e-2, 0.0, 0.0))
    assert torch.isfinite(net.fc1.weight).all()
    torch.testing.assert_close(net.fc1.weight, twin.fc1.weight, rtol=1e-10, atol=1e-12)
    radius = tracker._rewrites[0].radius_values()["fc1"][3]
    assert 0 < float(radius) < 0.1  # taken at its first non-zero step: Adam's first step, of length ~ η√d
    tracker.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["rotational", "hyperball"])
def test_sixteen_bit_weights_stay_finite_on_their_sphere(dtype, mode):
    torch.manual_seed(0)
    net = Net(dtype=dtype)
    data = batches(30, 4, dtype)
    start = net.fc1.weight.detach().float().norm(dim=1)
    optimizers = [torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-4)]
    tracker = SphereTracker(find_invariant_groups(net, data[0][0]), optimizers, correction=mode)
    for batch in data:
        train_step(net, optimizers, batch)
    rows = net.fc1.weight.detach().float()
    assert torch.isfinite(rows).all()
    if mode == "rotational":
        start = tracker._rewrites[0].radius_values()["fc1"].float()
    torch.testing.assert_close(rows.norm(dim=1), start, rtol=2e-2, atol=0)  # 16-bit round-off of the rows
    assert (rows - Net(dtype=dtype).fc1.weight.float()).abs().max() > 0.05  # it trained
    tracker.close()


# ----------------------------------------------------------------------------------------------- refusals


def refusal(optimizer: torch.optim.Optimizer, mode: Any) -> str:
    net = Net()
    with pytest.raises(ValueError) as err:
        SphereTracker(find_invariant_groups(net, batches(1, 1)[0][0]), [optimizer(net)], correction=mode)
    return str(err.value)


def test_refusals_say_what_to_change():
    lbfgs = refusal(lambda n: torch.optim.LBFGS(n.parameters()), "rotational")
    assert "torch.optim.LBFGS" in lbfgs and "line search" in lbfgs
    coupled = refusal(lambda n: torch.optim.SGD(n.parameters(), lr=0.1, weight_decay=1e-2), "hyperball")
    assert "fc1 (param group 0 of its optimizer)" in coupled
    assert "added to the gradient" in coupled and "weight_decay=0 in the param group of the tracked layers" in coupled
    adam_l2 = refusal(lambda n: torch.optim.Adam(n.parameters(), lr=1e-2, weight_decay=1e-2), "rotational")
    assert "knows no equilibrium angle for torch.optim.Adam" in adam_l2 and "added to the gradient" in adam_l2
    assert "Rotational(angular_update=" in adam_l2
    nesterov = refusal(lambda n: torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                                 weight_decay=1e-2), "rotational")  # fmt: skip
    assert "(nesterov=True)" in nesterov and "Set one" not in nesterov
    no_decay = refusal(lambda n: torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9), "rotational")
    assert "weight_decay=0" in no_decay and "needs a weight decay" in no_decay
    outside = refusal(lambda n: torch.optim.RMSprop(n.parameters(), lr=1e-3), "rotational")
    assert "outside the optimizer registry" in outside and "weight decay" not in outside  # nothing circular
    returned = refusal(lambda n: torch.optim.AdamW(n.parameters(), lr=1e-2), Rotational(angular_update=lambda g: None))
    assert "returned None" in returned

    class Custom(torch.optim.SGD):
        pass

    unknown = refusal(lambda n: Custom(n.parameters(), lr=0.1, weight_decay=1e-2), "hyperball")
    assert "does not know how" in unknown and "register_optimizer" in unknown


def test_only_the_param_groups_of_tracked_layers_are_checked():
    """The usual recipes: a decay on the head only (hyperball over SGD), the head and gains without decay (rotational
    over AdamW) — refused before, though no tracked layer was in the offending group."""

    def split(net: Net, tracked: dict[str, Any], rest: dict[str, Any]) -> list[dict[str, Any]]:
        mine = [net.fc1.weight, *net.fc2.parameters()]
        others = [p for p in net.parameters() if all(p is not q for q in mine)]
        return [{"params": mine, **tracked}, {"params": others, **rest}]

    for make, mode in [
        (lambda n: torch.optim.SGD(split(n, dict(weight_decay=0.0), dict(weight_decay=5e-4)), lr=0.1), "hyperball"),
        (lambda n: torch.optim.AdamW(split(n, dict(weight_decay=0.1), dict(weight_decay=0.0)), lr=1e-2), "rotational"),
    ]:
        net = Net()
        optimizer = make(net)
        tracker = SphereTracker(find_invariant_groups(net, batches(1, 1)[0][0]), [optimizer], correction=mode)
        assert sorted(tracker.corrections) == ["fc1", "fc2"]
        for batch in batches(3, 2):
            train_step(net, [optimizer], batch)
        tracker.close()


def test_centering_that_turns_a_group_is_announced():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.fc1.weight += 0.3  # a trained layer's rows need not be centered
    warnings: list[str] = []
    optimizers = [torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)]
    found = find_invariant_groups(net, batches(1, 1)[0][0])
    SphereTracker(found, optimizers, correction="rotational", warn=warnings.append)
    rows = net.fc1.weight.detach()
    largest = float((rows.mean(1).abs() * math.sqrt(IN) / rows.norm(dim=1)).asin().max())
    assert any(f"turns the groups of 2 of 2 modules by more than 0.01 rad at their first step, up to {largest:.2g} rad "
               "(fc1)" in w for w in warnings), warnings  # fmt: skip
    quiet: list[str] = []
    SphereTracker(find_invariant_groups(net, batches(1, 1)[0][0]), optimizers, correction=Rotational(center=False),
                  warn=quiet.append)  # fmt: skip
    assert not any("centering" in w for w in quiet)


def test_schedule_free_is_refused():
    schedulefree = pytest.importorskip("schedulefree")
    message = refusal(lambda n: schedulefree.AdamWScheduleFree(n.parameters(), lr=1e-2), "hyperball")
    assert "AdamWScheduleFree" in message and "does not hold" in message


def test_an_optimizer_outside_the_registry_without_decay_is_steered():
    """Any optimizer whose step is one update: the hyperball needs nothing else (RMSprop is measured only)."""
    got, want, _ = twin_run_with(lambda n: [torch.optim.RMSprop(n.parameters(), lr=1e-3)], "hyperball")
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def twin_run_with(make: Callable[[Net], list[torch.optim.Optimizer]], mode: Any):
    CASES["custom"] = (make, 0.0, None)
    try:
        return twin_run("custom", mode, ReferenceHyperball())
    finally:
        del CASES["custom"]


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(update_norm_decay=1.0), "update_norm_decay"),
        (dict(eps=-1.0), "eps"),
        (dict(angular_update=-0.1), "angular_update"),
        (dict(angular_update=True), "angular_update"),
        (dict(center="no"), "center"),
        (dict(update_norm_decay=True), "update_norm_decay"),
    ],
)
def test_bad_options_are_refused_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        Rotational(**options)


@pytest.mark.parametrize("radius", [0.0, True, "1"])
def test_bad_radius_is_refused(radius):
    with pytest.raises(ValueError, match="radius"):
        Hyperball(radius=radius)


def test_a_wide_group_in_float16_keeps_turning():
    """Lion's update has ‖u‖² = d: the running mean of ‖u_⊥‖², kept per entry, does not overflow float16 (65504)
    for a 320 × 320 layer, and the group goes on turning by η_r."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(320, 320, bias=False), nn.LayerNorm(320, elementwise_affine=False), nn.Linear(320, 5))
    net = net.half()
    optimizer = lion_pytorch.Lion(net.parameters(), lr=1e-4, weight_decay=1.0)
    x = torch.randn(16, 320, dtype=torch.float16)
    tracker = SphereTracker(find_invariant_groups(net, x), [optimizer], correction=Rotational(angular_update=0.01))
    before = net[0].weight.detach().float().clone()
    for _ in range(20):
        F.cross_entropy(net(torch.randn(16, 320, dtype=torch.float16)).float(), torch.randint(0, 5, (16,))).backward()
        optimizer.step()
        optimizer.zero_grad()
    state = optimizer.state[net[0].weight]["sphere_rotational:0"]
    assert torch.isfinite(state).all()
    after = net[0].weight.detach().float()
    angle = torch.arccos((before * after).sum() / (before.norm() * after.norm())).item()
    assert angle > 0.05  # 20 steps of ~0.01 rad (random directions): frozen, it read 0.007 before
    tracker.close()


# ----------------------------------------------------------------------------------------------- the monitor


class Module(pl.LightningModule):
    def __init__(self, make: Callable[[Any], Any], labels_seed: int = 0, steps: int = 64) -> None:
        super().__init__()
        self.net = Net(dtype=torch.float32)
        self.make = make
        gen = torch.Generator().manual_seed(labels_seed)
        n = 32 * steps
        self.data = TensorDataset(torch.randn(n, IN, generator=gen), torch.randint(0, OUT, (n,), generator=gen))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return self.make(self.parameters())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=32)


def test_the_monitor_logs_the_target_and_the_angular_update_sits_on_it(tmp_path):
    """Random labels (noise that stays): AdamW + rotational's RMS angular update over the last 150 of 300 steps
    within 5% of η_r = √(2ηλ(1 − β1)/(1 + β1)) computed here; SGD's hyperball at atan(η) on every step (its update,
    the gradient, is tangent)."""
    lr, decay = 1e-2, 0.1
    rotational = fit(Module(lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=decay), steps=300), tmp_path,
                     [SphereMonitor(spherical_correction="rotational")], max_steps=300)  # fmt: skip
    logged = rotational.logger.sphere()
    target = adamw_target(lr, decay, 0.9)
    for values in logged.values():
        assert values["sphere/angular_update_equilibrium/all"] == pytest.approx(target, rel=1e-12)
    last = [v["sphere/angular_update/all"] for step, v in logged.items() if step >= 150]
    assert math.sqrt(sum(a * a for a in last) / len(last)) == pytest.approx(target, rel=0.05)
    # the step is the mode's, not AdamW's: no update length, no Adam diagnostics of a ⊘ b
    for key in ("update_scale", "deformation_cos", "momentum_radial"):
        assert f"sphere/{key}/all" not in logged[max(logged)], key

    monitor = SphereMonitor(spherical_correction="hyperball")
    hyperball = fit(Module(lambda p: torch.optim.SGD(p, lr=0.05)), tmp_path, [monitor], max_steps=20)
    for values in hyperball.logger.sphere().values():
        assert values["sphere/angular_update_equilibrium/all"] == pytest.approx(math.atan(0.05), rel=1e-12)
        assert values["sphere/angular_update/all"] == pytest.approx(math.atan(0.05), rel=1e-5)


def test_the_monitor_refuses_at_setup_with_a_misconfiguration(tmp_path):
    module = Module(lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-2))
    with pytest.raises(MisconfigurationException, match="added to the gradient"):
        fit(module, tmp_path, [SphereMonitor(spherical_correction="hyperball")])


def test_the_summary_names_the_mode(tmp_path, caplog):
    fit(Module(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)), tmp_path,
        [SphereMonitor(spherical_correction=Hyperball())], max_steps=2)  # fmt: skip
    assert "hyperball AdamW" in caplog.text


def test_a_lightning_checkpoint_carries_the_state_into_the_resumed_run(tmp_path):
    """The state rides in the optimizer's part of Lightning's checkpoint, and the resumed run takes it: after its
    first step the radii are the saved ones bit for bit and β^t went on from the saved t (a radius taken afresh
    would be the resumed weights' norm, R up to round-off; a fresh t would read β¹). The trajectory's exactness
    across a round trip is the state-dict test above (Lightning's own resume replays batches here)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    def module() -> Module:
        torch.manual_seed(0)
        return Module(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1), steps=6)

    callbacks = [SphereMonitor(spherical_correction="rotational"),
                 ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1)]  # fmt: skip
    fit(module(), tmp_path, callbacks, max_steps=6, enable_checkpointing=True)
    checkpoint = torch.load(tmp_path / "epoch=0-step=6.ckpt", weights_only=False)
    saved = checkpoint["optimizer_states"][0]["state"][0]["sphere_rotational:net.fc1"]
    assert saved.shape == (HIDDEN, 3) and saved.dtype == torch.float32
    monitor = SphereMonitor(spherical_correction="rotational")
    trainer = pl.Trainer(callbacks=[monitor], accelerator="cpu", max_steps=7, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, logger=MemoryLogger(),
                         default_root_dir=tmp_path)  # fmt: skip
    model = module()
    trainer.fit(model, ckpt_path=str(tmp_path / "epoch=0-step=6.ckpt"))
    state = trainer.optimizers[0].state[model.net.fc1.weight]["sphere_rotational:net.fc1"]
    assert torch.equal(state[:, 0], saved[:, 0])
    assert torch.equal(state[:, 2], (saved[:, 2].double() * 0.9).float())


# ----------------------------------------------------------------------------------------------- layer kinds


@pytest.mark.parametrize("mode", ["rotational", "hyperball"])
@pytest.mark.parametrize("kind", ["spectral_norm", "mask", "prune"])
def test_parametrized_and_pruned_layers_are_held_on_the_tensor_the_optimizer_steps(kind, mode):
    """issue 18's layer kinds: the mode acts on the tensor the optimizer steps (spectral_norm's original, whose
    whole-matrix scale is free; a masked or pruned weight's, whose rows are), and holds its groups' norms."""
    from tests.test_every_optimizer import LAYERS, stepped_weight

    torch.manual_seed(0)
    net = Net()
    LAYERS[kind](net.fc1)
    optimizers = [torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)]
    tracker = SphereTracker(find_invariant_groups(net, batches(1, 1)[0][0]), optimizers, correction=mode)
    assert "fc1" in [e.module_name for e in tracker.groups], tracker.untracked
    weight = stepped_weight(net.fc1)

    def norms() -> Tensor:
        w = weight.detach()
        return w.norm()[None] if kind == "spectral_norm" else w.norm(dim=1)

    data = batches(10, 2)
    train_step(net, optimizers, data[0])
    first, start = norms(), weight.detach().clone()
    for batch in data[1:]:
        train_step(net, optimizers, batch)
    torch.testing.assert_close(norms(), first, rtol=1e-12, atol=0)
    assert (weight.detach() - start).abs().max() > 1e-3  # it trained
    tracker.close()


def test_an_optimizer_that_drops_its_gradients_is_steered(monkeypatch):
    """heavyball sets ``p.grad`` to None in its step: the gradients are held from before the update, so the module
    is not taken for one the optimizer did not step (before: the hyperball silently did nothing, the norms drifted
    by 3e-2 in five steps)."""
    heavyball = pytest.importorskip("heavyball")
    monkeypatch.setattr(heavyball.utils, "compile_mode", None)  # eager: compiling costs seconds per optimizer
    monkeypatch.setattr(heavyball.utils, "compile_mode_recommended_to_none", None)
    got, want, _ = twin_run_with(lambda n: [heavyball.AdamW(n.parameters(), lr=1e-2, weight_decay=0.0)], "hyperball")
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
