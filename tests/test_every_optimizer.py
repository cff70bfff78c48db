"""Issue 18's property: for every optimizer, clipping mode and kind of layer, the monitor (no correction) leaves
training bitwise as it is without it, and every metric it logs is the one an independent float64 computation
gets from the step: x_k, x_{k+1} and the gradient the update consumed, captured by the model itself.

The grid: every optimizer class ``torch.optim`` exports (enumerated, so that a new release's are covered),
schedule-free AdamW and SGD, Lion, Prodigy, heavyball's AdamW, SGD, SFAdamW, Muon and HyperBallAdamW × no clipping,
clipping by norm, by value × a plain layer, ``spectral_norm``, a user parametrization (a weight mask), ``prune``.
The default run takes a fast subset (``FAST``); ``pytest -m slow`` the whole cross product.

The model is float64: the package then does its math in float64, so that a disagreement beyond float32
round-off (the tolerance, 1e-6 relative) is a wrong quantity, never noise; a float32 model would need about
1e-4 relative and an absolute floor on the cosines. Every parameter is 2-D (a bias-free Linear →
BatchNorm1d(affine=False) → ReLU → bias-free Linear head), so that ``torch.optim.Muon``, which takes matrices
only, trains the same model as every other optimizer.

Where the capture comes from, in Lightning's automatic optimization: ``optimizer_step`` copies x_k before
the optimizer's step and x_{k+1} after it; ``configure_gradient_clipping``, which Lightning calls after
``on_before_optimizer_step`` on every closure evaluation, whether or not it clips, copies the gradient after
clipping, at the first evaluation of the step (LBFGS evaluates the closure several times, at other points:
the first gives ∇L(x_k), the gradient the metrics of §1 are defined with). None of it uses
the package's code: the expected values come from ``tests/reference.py``.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lion_pytorch
import prodigyopt
import pytest
import pytorch_lightning as pl
import schedulefree
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize, prune
from torch.nn.utils.parametrizations import spectral_norm
from torch.utils.data import DataLoader, TensorDataset

from lightning_sphere import SphereMonitor, SphereTracker, find_invariant_groups
from tests import reference
from tests.lightning_helpers import MemoryLogger
from tests.twin import same_bits

#: The metrics checked against the capture: the step's (any optimizer) and the gradient's.
STEP_METRICS = ("norm", "angular_update", "radial_update", "tangential_update")
GRADIENT_METRICS = ("grad_cos", "sphere_grad_norm", "direction_cos", "effective_lr")
#: Adam's a and b, for torch's Adam and AdamW and Prodigy.
ADAM_METRICS = ("deformation_cos", "momentum_radial")
#: §8's update length, for Muon and Lion.
LENGTH_METRICS = ("update_scale",)
#: float32 round-off, relative; absolute for values near 0 (grad_cos on an invariant group reads 1e-5…1e-4).
REL, ABS = 1e-6, 1e-10

STEPS = 4
BATCH = 16


# ----------------------------------------------------------------------------------------------- optimizers


@dataclass(frozen=True)
class Opt:
    """One optimizer of the grid."""

    name: str
    make: Callable[[Any], torch.optim.Optimizer]
    #: the §3 closed-form effective learning rate applies (SGD, Adam, AdamW, Prodigy); else the measured one
    closed_form: bool = False
    #: ``(optimizer, weight, param group) → {"a", "b"}`` after the step (§2), for the Adam diagnostics: torch's
    #: Adam/AdamW and Prodigy
    ab: Callable[..., dict[str, Tensor]] | None = None
    #: ``param group before the step → η``, the learning rate in force, where it is not the group's ``lr``
    lr_in_force: Callable[[dict[str, Any]], float] | None = None
    #: §8: the length of a row's update per unit of η (Muon: s √(B/A) for this 32 × 16 weight; Lion: √16), and
    #: the decoupled decay per unit of η, for ``update_scale``
    length: float | None = None
    decay: float = 0.0
    #: why it cannot run here, if it cannot
    skip: str | None = None

    @property
    def adam(self) -> bool:
        return self.ab is not None


#: Hyper-parameters that make every step visible on the sphere (a weight decay where there is one, so that an
#: optimizer that folds it into the gradient shows it); a class not named here runs with its defaults.
TORCH_OPTIONS: dict[str, dict[str, Any]] = {
    "SGD": dict(lr=0.1, momentum=0.9, weight_decay=1e-2),
    "Adam": dict(lr=1e-2, weight_decay=1e-3),
    "AdamW": dict(lr=1e-2, weight_decay=0.1),
    "Adafactor": dict(lr=1e-2, weight_decay=1e-2),
    "Adadelta": dict(lr=1.0, weight_decay=1e-3),
    "Adagrad": dict(lr=5e-2, weight_decay=1e-3),
    "Adamax": dict(lr=1e-2, weight_decay=1e-3),
    "ASGD": dict(lr=5e-2, weight_decay=1e-3),
    "LBFGS": dict(lr=0.5, max_iter=3),
    "Muon": dict(lr=2e-2, weight_decay=0.1),
    "NAdam": dict(lr=1e-2, weight_decay=1e-3),
    "RAdam": dict(lr=1e-2, weight_decay=1e-3),
    "RMSprop": dict(lr=1e-2, momentum=0.5, weight_decay=1e-3),
    "Rprop": dict(lr=1e-2),
}

#: Optimizers that cannot train this model, with the reason.
TORCH_SKIPS = {
    "SparseAdam": "SparseAdam takes sparse gradients only (nn.Embedding(sparse=True)); these layers' are dense"
}


def torch_optimizers() -> list[type[torch.optim.Optimizer]]:
    """Every optimizer class ``torch.optim`` exports."""
    classes = (getattr(torch.optim, name) for name in torch.optim.__all__)
    return [
        c
        for c in classes
        if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer
    ]


def _torch(cls: type[torch.optim.Optimizer]) -> Opt:
    options = TORCH_OPTIONS.get(cls.__name__, {})
    muon = cls.__name__ == "Muon"  # (torch >= 2.9) 32 × 16: s = √max(1, 32/16), rows of norm √(16/32) when orthogonal
    return Opt(
        f"torch.{cls.__name__}",
        lambda params: cls(params, **options),
        closed_form=cls in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW),
        ab=(lambda optimizer, weight, group: adam_ab(optimizer, weight, group))
        if cls in (torch.optim.Adam, torch.optim.AdamW)
        else None,
        length=math.sqrt(2) * math.sqrt(16 / 32) if muon else None,
        decay=options.get("weight_decay", 0.0) if muon else 0.0,
        skip=TORCH_SKIPS.get(cls.__name__),
    )


def _heavyball(name: str, **options: Any) -> Opt:
    def make(params: Any) -> torch.optim.Optimizer:
        # heavyball needs numpy ≥ 2.3, so Python ≥ 3.11: the `test` extra leaves it out on 3.10
        heavyball = pytest.importorskip("heavyball")
        return getattr(heavyball, name)(params, **options)

    return Opt(f"heavyball.{name}", make)


OPTIMIZERS = [
    *(_torch(c) for c in torch_optimizers()),
    Opt(
        "schedulefree.AdamWScheduleFree",
        lambda p: schedulefree.AdamWScheduleFree(p, lr=1e-2, weight_decay=1e-2, warmup_steps=0),
    ),
    Opt("schedulefree.SGDScheduleFree", lambda p: schedulefree.SGDScheduleFree(p, lr=0.1, weight_decay=1e-2)),
    Opt("lion_pytorch.Lion", lambda p: lion_pytorch.Lion(p, lr=1e-3, weight_decay=1e-2), length=4.0, decay=1e-2),
    Opt(
        "prodigyopt.Prodigy",
        lambda p: prodigyopt.Prodigy(p, lr=1.0, weight_decay=1e-2),
        closed_form=True,
        ab=lambda optimizer, weight, group: prodigy_ab(optimizer, weight, group),
        lr_in_force=lambda group: prodigy_lr(group),
    ),
    _heavyball("AdamW", lr=1e-2, weight_decay=1e-2),
    _heavyball("SGD", lr=0.1, weight_decay=1e-2),
    _heavyball("SFAdamW", lr=1e-2, weight_decay=1e-2),
    _heavyball("Muon", lr=2e-2, weight_decay=1e-2),
    _heavyball("HyperBallAdamW", lr=1e-2),
]
BY_NAME = {o.name: o for o in OPTIMIZERS}


@pytest.fixture(autouse=True)
def _heavyball_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """heavyball ``torch.compile``s its kernels on first use (seconds per optimizer): eager here."""
    if importlib.util.find_spec("heavyball") is not None:
        import heavyball

        monkeypatch.setattr(heavyball.utils, "compile_mode", None)
        monkeypatch.setattr(heavyball.utils, "compile_mode_recommended_to_none", None)


# ------------------------------------------------------------------------------------------ clipping, layers

#: Trainer options per clipping mode. Lightning refuses neither for any optimizer in 32/64-bit automatic
#: optimization (LBFGS included: every closure evaluation is clipped); it refuses clipping only under manual
#: optimization, and under AMP for optimizers that unscale internally (fused), neither of which is here.
CLIPPING: dict[str, dict[str, Any]] = {
    "none": {},
    "norm": dict(gradient_clip_val=0.5, gradient_clip_algorithm="norm"),  # the gradients' norm is 1.1–1.4
    "value": dict(gradient_clip_val=0.05, gradient_clip_algorithm="value"),  # max |g| is 0.15–0.3: some clipped
}


class Mask(nn.Module):
    """A user parametrization: weight = X * mask."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mask


def plain(layer: nn.Linear) -> None:
    pass


def spectral(layer: nn.Linear) -> None:
    spectral_norm(layer)


def masked(layer: nn.Linear) -> None:
    mask = (torch.rand(layer.weight.shape) > 0.25).to(layer.weight.dtype)
    parametrize.register_parametrization(layer, "weight", Mask(mask))


def pruned(layer: nn.Linear) -> None:
    prune.random_unstructured(layer, "weight", amount=0.3)


LAYERS: dict[str, Callable[[nn.Linear], None]] = {
    "plain": plain,
    "spectral_norm": spectral,
    "mask": masked,
    "prune": pruned,
}


def stepped_weight(layer: nn.Module) -> Tensor:
    """The tensor the optimizer steps for a layer's weight: the rows the monitor must track."""
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight.original
    if hasattr(layer, "weight_orig"):  # torch.nn.utils.prune
        return layer.weight_orig
    return layer.weight


# ----------------------------------------------------------------------------------------------- the model


class Model(pl.LightningModule):
    """bias-free Linear → BatchNorm1d(affine=False) → ReLU → bias-free Linear; the hidden layer (the one
    invariant module, per row) of the given kind. Records its losses and, per optimizer step, float64 rows
    of x_k, x_{k+1} and of the gradient the update consumed (after clipping), with the lr in force."""

    def __init__(self, seed: int, opt: Opt, layer: str, skip_hidden_on_odd_steps: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = nn.Linear(16, 32, bias=False, dtype=torch.float64)
        self.norm = nn.BatchNorm1d(32, affine=False, dtype=torch.float64)
        self.head = nn.Linear(32, 10, bias=False, dtype=torch.float64)
        self.shortcut = nn.Linear(16, 10, bias=False, dtype=torch.float64) if skip_hidden_on_odd_steps else None
        LAYERS[layer](self.hidden)
        gen = torch.Generator().manual_seed(seed + 1)
        self.data = TensorDataset(
            torch.randn(STEPS * BATCH, 16, generator=gen, dtype=torch.float64),
            torch.randint(0, 10, (STEPS * BATCH,), generator=gen),
        )
        self.opt = opt
        self.losses: list[Tensor] = []
        self.steps: list[dict[str, Any]] = []
        self.clipping: list[tuple[Tensor, Tensor]] = []  # per step: all gradients before and after clipping
        self._pending: dict[str, Any] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.shortcut is not None and self.global_step % 2:
            return self.shortcut(x)  # the hidden layer gets no gradient on this step
        return self.head(F.relu(self.norm(self.hidden(x))))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(loss.detach().clone())
        return loss

    def configure_optimizers(self) -> Any:
        return self.opt.make(self.parameters())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=BATCH)

    def on_train_start(self) -> None:
        optimizer = self.trainer.optimizers[0]
        if callable(getattr(optimizer, "train", None)):
            optimizer.train()  # schedule-free optimizers: their docs require it before training

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        weight = stepped_weight(self.hidden)
        group = next(g for g in optimizer.param_groups if any(p is weight for p in g["params"]))
        lr = group.get("lr") if self.opt.lr_in_force is None else self.opt.lr_in_force(group)
        self._pending = {"x0": reference.rows(weight), "lr": lr}
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        record, self._pending = self._pending, None
        record["x1"] = reference.rows(weight)
        if self.opt.ab is not None:
            record.update(self.opt.ab(getattr(optimizer, "optimizer", optimizer), weight, group))
        self.steps.append(record)

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None
    ) -> None:
        first = self._pending is not None and "grad" not in self._pending
        if first:
            before = all_gradients(optimizer)
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if first:
            grad = stepped_weight(self.hidden).grad
            self._pending["grad"] = None if grad is None else reference.rows(grad)
            self.clipping.append((before, all_gradients(optimizer)))


def all_gradients(optimizer: Any) -> Tensor:
    grads = [p.grad.detach().flatten() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return torch.cat(grads).to(torch.float64, copy=True)


def adam_ab(optimizer: torch.optim.Optimizer, weight: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
    """torch's Adam/AdamW after a step (§2.2): a = m̂, b = √v̂ + ε, rows in float64."""
    state = optimizer.state[weight]
    beta1, beta2 = group["betas"]
    t = float(state["step"])
    second = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
    a = reference.rows(state["exp_avg"]) / (1 - beta1**t)
    b = reference.rows(second).sqrt() / math.sqrt(1 - beta2**t) + group["eps"]
    return {"a": a, "b": b}


def prodigy_lr(group: dict[str, Any]) -> float:
    """Prodigy's learning rate as Adam's (docs/theory.md §8.6): d η, from its param group before the step."""
    return group["d"] * group["lr"]


def prodigy_ab(optimizer: torch.optim.Optimizer, weight: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
    """Prodigy after a step (§8.6): a = m/(d c₁), b = √v/(d c₂) + ε/c₂, d as the step left it, c₁ = 1 − β1^t and
    c₂ = √(1 − β2^t) with ``use_bias_correction`` (else 1), t its step count ``k`` after the step."""
    state, d, t = optimizer.state[weight], group["d"], group["k"]
    beta1, beta2 = group["betas"]
    c1, c2 = (1 - beta1**t, math.sqrt(1 - beta2**t)) if group["use_bias_correction"] else (1.0, 1.0)
    a = reference.rows(state["exp_avg"]) / (d * c1)
    return {"a": a, "b": reference.rows(state["exp_avg_sq"]).sqrt() / (d * c2) + group["eps"] / c2}


# -------------------------------------------------------------------------------------------- the checks


def train(seed: int, opt: Opt, layer: str, clipping: str, monitor: bool, tmp_path: Any, **model_options: Any):
    model = Model(seed, opt, layer, **model_options)
    logger = MemoryLogger()
    callbacks = [SphereMonitor(per_layer=True)] if monitor else []
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        logger=logger,
        callbacks=callbacks,
        **CLIPPING[clipping],
    )
    trainer.fit(model)
    return model, trainer, logger


def assert_same_bits(a: Any, b: Any, where: str) -> None:
    """Nested dicts/lists/tuples of tensors and plain values: tensors bitwise, the rest by ==."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and same_bits(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for key in a:
            assert_same_bits(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_bits(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"  # NaN == NaN here


def needs_gradient(opt: Opt) -> tuple[str, ...]:
    """The metrics not defined on a step without a gradient (the measured effective lr is one)."""
    return GRADIENT_METRICS if not opt.closed_form else tuple(m for m in GRADIENT_METRICS if m != "effective_lr")


def expected_metrics(record: dict[str, Any], opt: Opt) -> dict[str, Tensor]:
    """Per-row reference values of one captured step (``tests/reference.py``)."""
    kwargs: dict[str, Any] = {"a": record["a"], "b": record["b"]} if opt.adam else {}
    grad = record["grad"] if record["grad"] is not None else torch.zeros_like(record["x0"])
    lr = record["lr"] if record["lr"] is not None else 1.0
    if opt.length is not None:
        kwargs.update(decay=lr * opt.decay, length=lr * opt.length)
    return reference.group_metrics(record["x0"], record["x1"], grad, lr, measured=not opt.closed_form, **kwargs)


def check_step(logged: dict[str, float], record: dict[str, Any], opt: Opt, names: tuple[str, ...], step: int) -> None:
    """One step's logged metrics for the one tracked layer (``names``: its name and ``all``) against the capture.
    With a gradient every metric must be there; without, those that need one must not, and the others (the
    step did nothing to the layer) are checked when logged."""
    want = expected_metrics(record, opt)
    metrics = (
        *STEP_METRICS,
        *GRADIENT_METRICS,
        *(ADAM_METRICS if opt.adam else ()),
        *LENGTH_METRICS[: bool(opt.length)],
    )
    for metric in metrics:
        for name in names:
            key = f"sphere/{metric}/{name}"
            if record["grad"] is None and metric in needs_gradient(opt):
                assert key not in logged, f"step {step}: {key} logged on a step without a gradient: {logged[key]}"
            elif record["grad"] is not None or key in logged:
                assert key in logged, f"step {step}: {key} not logged"
                value = reference.summarize(want[metric], reference.REDUCE[metric])
                assert logged[key] == pytest.approx(value, rel=REL, abs=ABS), f"step {step}: {key}"
    if record["grad"] is not None:
        assert logged.get("sphere/skipped_groups/all", 0.0) == 0.0, f"step {step}"


def check_metrics(model: Model, logger: MemoryLogger, opt: Opt) -> None:
    """Every step is logged (``log_every_n_steps=1``), with the capture's metrics."""
    records = logger.sphere()
    assert sorted(records) == list(range(len(model.steps))), "one record per optimizer step"
    for step, record in enumerate(model.steps):
        check_step(records[step], record, opt, ("hidden", "all"), step)


def assert_runs_identical(model: Model, trainer: pl.Trainer, plain_model: Model) -> None:
    """The monitored run is bitwise the run without the monitor: losses (every closure evaluation),
    parameters, buffers (spectral_norm's u and v, BatchNorm's statistics, masks), optimizer state."""
    assert_same_bits(model.losses, plain_model.losses, "losses")
    assert_same_bits(dict(model.named_parameters()), dict(plain_model.named_parameters()), "parameters")
    assert_same_bits(dict(model.named_buffers()), dict(plain_model.named_buffers()), "buffers")
    assert_same_bits(
        trainer.optimizers[0].state_dict(), plain_model.trainer.optimizers[0].state_dict(), "optimizer state"
    )


def check_clipping(model: Model, clipping: str) -> None:
    """The clipping axis is real: the first step's gradient was clipped, and every step's is within bounds."""
    if clipping == "none":
        return
    bound = CLIPPING[clipping]["gradient_clip_val"]
    size = (lambda g: g.norm()) if clipping == "norm" else (lambda g: g.abs().max())
    assert size(model.clipping[0][0]) > bound, "the first step's gradient was not clipped"
    for _, after in model.clipping:
        assert size(after) <= bound * (1 + 1e-9)


def run_case(opt: Opt, layer: str, clipping: str, tmp_path: Any) -> None:
    if opt.skip:
        pytest.skip(opt.skip)
    seed = int(torch.randint(2**31 - 1, ()))  # from the suite's seed (conftest)
    plain_model, _, _ = train(seed, opt, layer, clipping, False, tmp_path / "without")
    model, trainer, logger = train(seed, opt, layer, clipping, True, tmp_path / "with")

    # 1. The monitor changes nothing.
    assert_runs_identical(model, trainer, plain_model)

    # 2. It tracks the hidden layer's rows, of the tensor the optimizer steps, and measures what happened.
    check_clipping(model, clipping)
    monitor = trainer.callbacks[0]
    assert [g.module_name for g in monitor.groups] == ["hidden"], monitor.summary()
    assert all(r["grad"] is not None for r in model.steps)
    check_metrics(model, logger, opt)


# ------------------------------------------------------------------------------------------------- the grid

#: The default run: every optimizer with the plain layer and no clipping; each clipping mode and each kind
#: of layer with torch's SGD, schedule-free AdamW (changes its gradient in place) and heavyball's AdamW (drops
#: its gradient in the step).
FAST = {(o.name, "plain", "none") for o in OPTIMIZERS} | {
    (name, layer, clipping)
    for name in ("torch.SGD", "schedulefree.AdamWScheduleFree", "heavyball.AdamW")
    for layer, clipping in [*((k, "none") for k in LAYERS), ("plain", "norm"), ("plain", "value")]
}


def grid() -> list[Any]:
    cases = []
    for opt in OPTIMIZERS:
        for layer in LAYERS:
            for clipping in CLIPPING:
                marks = () if (opt.name, layer, clipping) in FAST else pytest.mark.slow
                cases.append(pytest.param(opt.name, layer, clipping, id=f"{opt.name}-{layer}-{clipping}", marks=marks))
    return cases


@pytest.mark.parametrize(("name", "layer", "clipping"), grid())
def test_monitor_changes_nothing_and_measures_the_step(name, layer, clipping, tmp_path):
    run_case(BY_NAME[name], layer, clipping, tmp_path)


def test_the_grid_covers_every_torch_optimizer():
    """A class a new torch release adds joins the grid by itself (with its default hyper-parameters)."""
    names = {o.name for o in OPTIMIZERS}
    assert {f"torch.{c.__name__}" for c in torch_optimizers()} <= names
    assert {"torch.SGD", "torch.Adam", "torch.AdamW", "torch.LBFGS"} <= names
    assert ("torch.Muon" in names) == hasattr(torch.optim, "Muon")  # torch >= 2.9


@pytest.mark.parametrize(
    "name", ["torch.SGD", "torch.Adam", "lion_pytorch.Lion", "schedulefree.AdamWScheduleFree", "heavyball.AdamW"]
)
def test_no_gradient_metric_for_a_step_without_gradient(name, tmp_path):
    """The hidden layer is used on even steps only: on odd ones it has no gradient, and the metrics that need
    one (the measured effective lr among them) are not logged for it; training is still unchanged."""
    opt = BY_NAME[name]
    seed = int(torch.randint(2**31 - 1, ()))
    plain_model, _, _ = train(seed, opt, "plain", "none", False, tmp_path / "without", skip_hidden_on_odd_steps=True)
    model, trainer, logger = train(seed, opt, "plain", "none", True, tmp_path / "with", skip_hidden_on_odd_steps=True)
    assert_runs_identical(model, trainer, plain_model)
    assert [r["grad"] is None for r in model.steps] == [False, True, False, True]
    assert [g.module_name for g in trainer.callbacks[0].groups] == ["hidden"]
    check_metrics(model, logger, opt)


# ---------------------------------------------------------------------------------------- plain PyTorch


def plain_loop(opt: Opt, seed: int, track: bool) -> tuple[nn.Module, torch.optim.Optimizer, list[Any]]:
    """The loop of docs/guides/pytorch.md over ``STEPS`` batches; with ``track``, the tracker measures every step
    and each step's capture (rows of x_k and of the gradient right before ``optimizer.step()``, x_{k+1} after) comes
    back with its measurement."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(16, 32, bias=False), nn.BatchNorm1d(32, affine=False), nn.ReLU(), nn.Linear(32, 10, bias=False)
    ).double()
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [
        (torch.randn(BATCH, 16, generator=gen, dtype=torch.float64), torch.randint(0, 10, (BATCH,), generator=gen))
        for _ in range(STEPS)
    ]
    optimizer = opt.make(model.parameters())
    if callable(getattr(optimizer, "train", None)):
        optimizer.train()
    tracker = SphereTracker(find_invariant_groups(model, batches[0][0]), [optimizer]) if track else None
    if tracker is not None:
        assert [g.module_name for g in tracker.groups] == ["0"]
    out = []
    for x, y in batches:
        if tracker is not None:
            tracker.arm()
        F.cross_entropy(model(x), y).backward()
        x0, grad = reference.rows(model[0].weight), reference.rows(model[0].weight.grad)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        optimizer.zero_grad()
        if tracker is not None:
            out.append(({"x0": x0, "x1": reference.rows(model[0].weight), "grad": grad, "lr": lr}, tracker.collect()))
    return model, optimizer, out


@pytest.mark.parametrize("name", ["schedulefree.AdamWScheduleFree", "heavyball.AdamW"])
def test_tracker_in_a_plain_loop(name):
    opt = BY_NAME[name]
    seed = int(torch.randint(2**31 - 1, ()))
    plain_model, plain_optimizer, _ = plain_loop(opt, seed, track=False)
    model, optimizer, steps = plain_loop(opt, seed, track=True)
    assert_same_bits(model.state_dict(), plain_model.state_dict(), "model")
    assert_same_bits(optimizer.state_dict(), plain_optimizer.state_dict(), "optimizer state")
    for step, (record, measurement) in enumerate(steps):
        assert measurement is not None, f"step {step} not measured"
        check_step(measurement.scalars, record, opt, ("0", "all"), step)
