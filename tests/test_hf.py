"""Issue 22: ``SphereCallback`` on Hugging Face's ``Trainer``, on a tiny Qwen3 (QK-norm: one invariant group per head
of every q_proj and k_proj) built from a config with random weights, nothing downloaded. Metrics against a float64
capture of the steps, training bitwise the same with the callback and no correction, a correction that holds the
norms, gradient accumulation."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lightning_sphere.integrations.transformers import SphereCallback  # noqa: E402
from tests.conftest import torch_at_least  # noqa: E402
from tests.tensorboard_read import Served  # noqa: E402

HEADS, HEAD_DIM, HIDDEN = 4, 8, 32
TRACKED = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj")]


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, length: int = 16, vocab: int = 64) -> None:
        self.x = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


class Capture(transformers.TrainerCallback):
    """x_k and x_{k+1} of the tracked weights at every step, and what was logged."""

    def __init__(self) -> None:
        self.steps: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        self.logs: list[dict[str, float]] = []
        self._before: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._before = {n: p.detach().clone() for n, p in model.named_parameters() if _tracked(n)}

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        after = {n: p.detach().clone() for n, p in model.named_parameters() if _tracked(n)}
        self.steps.append({n: (self._before[n], after[n]) for n in after})

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        self.logs.append(dict(logs))


def _tracked(name: str) -> bool:
    return any(name == f"{m}.weight" for m in TRACKED)


def model(dtype: torch.dtype = torch.float64) -> Any:
    config = transformers.Qwen3Config(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=2, head_dim=HEAD_DIM, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.Qwen3ForCausalLM(config).to(dtype)


def train(tmp_path: Any, callbacks: list[Any], dtype: torch.dtype = torch.float64, **options: Any) -> Any:
    settings = dict(
        output_dir=str(tmp_path), max_steps=6, logging_steps=2, per_device_train_batch_size=8, report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True, learning_rate=1e-3, weight_decay=0.1, seed=0,
    ) | options  # fmt: skip
    trainer = transformers.Trainer(
        model=model(dtype), args=transformers.TrainingArguments(**settings), train_dataset=Tokens(), callbacks=callbacks
    )
    trainer.train()
    return trainer


def head_angles(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """The angle each head's rows turned by, in float64 (one group per head: HEAD_DIM rows)."""
    a, b = x0.double().reshape(-1, HEAD_DIM * HIDDEN), x1.double().reshape(-1, HEAD_DIM * HIDDEN)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    return torch.arccos(cos.clamp(-1, 1))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"gradient_accumulation_steps": 2},
        {"gradient_checkpointing": True},
        # transformers before 5 checkpoints with use_reentrant=True: the layers run without a graph in forward, and
        # are read off the one the backward pass recomputes (before: nothing tracked, on transformers 4.51)
        {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}},
        pytest.param(  # the first step eager, then compiled
            {"torch_compile": True},
            marks=[
                pytest.mark.slow,
                torch_at_least(
                    "2.7", "torch 2.6's compiled attention backward fails in float64 on CPU, callback or not"
                ),
            ],
        ),
    ],
    ids=["plain", "accumulation", "checkpointing", "reentrant checkpointing", "compile"],
)
def test_metrics_reach_every_logger_and_match_the_float64_capture(tmp_path, options):
    capture, sphere = Capture(), SphereCallback()
    trainer = train(tmp_path, [capture, sphere], **options)
    assert trainer.callback_handler.callbacks[0] is sphere  # first: the reporting integrations see its keys
    assert all("learning_rate" in log for log in capture.logs if "loss" in log)  # next to the Trainer's own values
    check_against_capture(capture, (2, 4, 6), rel=1e-9)
    assert sorted(sphere.tracker.corrections) == [] and len(sphere.tracker.groups) == 4
    assert "model.layers.0.self_attn.q_proj" in sphere.summary() and "lm_head" in sphere.summary()


def test_training_is_bitwise_the_same_with_the_callback(tmp_path):
    plain = train(tmp_path / "plain", []).model.state_dict()
    watched = train(tmp_path / "watched", [SphereCallback()]).model.state_dict()
    for key, value in plain.items():
        assert torch.equal(value, watched[key]), key


def test_the_hyperball_holds_every_head_at_its_norm(tmp_path):
    capture = Capture()
    train(tmp_path, [capture, SphereCallback(spherical_correction="hyperball")], learning_rate=1e-2,
          lr_scheduler_type="constant")  # fmt: skip
    for step in capture.steps:
        for name in TRACKED:
            x0, x1 = step[f"{name}.weight"]
            rows0, rows1 = x0.reshape(-1, HEAD_DIM * HIDDEN), x1.reshape(-1, HEAD_DIM * HIDDEN)
            torch.testing.assert_close(rows1.norm(dim=1), rows0.norm(dim=1), rtol=1e-12, atol=0)
            # atan η for a tangent update; AdamW's has a small radial part (§9.2)
            assert head_angles(x0, x1).square().mean().sqrt() == pytest.approx(math.atan(1e-2), rel=0.05)


def test_a_correction_the_optimizer_cannot_take_is_refused(tmp_path):
    with pytest.raises(ValueError, match="added to the gradient"):
        train(tmp_path, [SphereCallback(spherical_correction="hyperball")], optim="sgd")


def check_against_capture(capture: Capture, steps: tuple[int, ...], rel: float) -> None:
    """Each logged step's per-layer angular update against the capture of that step (``steps``: 1-based)."""
    logged = [log for log in capture.logs if "loss" in log]
    assert len(logged) == len(steps)
    for log, step in zip(logged, steps, strict=True):
        for name in TRACKED:
            x0, x1 = capture.steps[step - 1][f"{name}.weight"]
            want = head_angles(x0, x1).square().mean().sqrt().item()
            assert log[f"sphere/angular_update/{name}"] == pytest.approx(want, rel=rel), (step, name)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_is_measured_as_captured(tmp_path, precision):
    """The Trainer's ``bf16``/``fp16`` (autocast, float32 weights): the step the optimizer takes on the float32
    weights, against the capture (float32 round-off of the per-head reductions)."""
    capture = Capture()
    train(tmp_path, [capture, SphereCallback()], dtype=torch.float32, **{precision: True})
    check_against_capture(capture, (2, 4, 6), rel=1e-5)


def test_a_resumed_run_finds_the_groups_again_and_measures_as_captured(tmp_path):
    """``resume_from_checkpoint``: the resumed run's first step finds the same groups; its logged step (6) against
    the capture of its own steps."""
    train(tmp_path, [SphereCallback()], save_strategy="steps", save_steps=4)
    resumed, sphere = Capture(), SphereCallback()
    trainer = transformers.Trainer(
        model=model(),
        args=transformers.TrainingArguments(
            output_dir=str(tmp_path), max_steps=6, logging_steps=2, per_device_train_batch_size=8, report_to=[],
            use_cpu=True, save_strategy="no", disable_tqdm=True, learning_rate=1e-3, weight_decay=0.1, seed=0,
        ),
        train_dataset=Tokens(),
        callbacks=[resumed, sphere],
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert len(sphere.tracker.groups) == 4
    resumed.steps = [None, None, None, None, *resumed.steps]  # the capture starts at step 5
    check_against_capture(resumed, (6,), rel=1e-9)


def test_tensorboard_gets_the_metrics_and_the_layout(tmp_path):
    """``report_to=["tensorboard"]``: the event file holds every logged key (under the Trainer's ``train/``) and the
    custom-scalars layout points at them; read back with TensorBoard's own reader."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sphere = SphereCallback()
    train(tmp_path, [sphere], report_to=["tensorboard"])
    (run,) = [p.parent for p in tmp_path.rglob("events.out.tfevents.*")]
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"train/{key}" for key in sphere.metrics} <= tags and "train/loss" in tags
    value = events.Scalars("train/sphere/angular_update/all")[-1]
    assert value.step == 6 and value.value == pytest.approx(sphere.metrics["sphere/angular_update/all"], rel=1e-6)
    served = Served(run.parent)  # what TensorBoard's Custom Scalars tab shows: the loss and learning rate first
    first, per_layer = served.layout()
    assert list(first["charts"])[:4] == ["train/loss", "learning rate", "effective_lr", "angular_update"]
    lines = {title: served.lines(run.name, first["charts"][title]) for title in list(first["charts"])[:4]}
    assert lines == {
        "train/loss": {"train/loss"},
        "learning rate": {"train/learning_rate"},
        "effective_lr": {"train/sphere/effective_lr/all"},
        "angular_update": {"train/sphere/angular_update/all", "train/sphere/angular_update_equilibrium/all"},
    }
    layers = {f"train/{key}" for key in sphere.metrics if key.startswith("sphere/norm/") and key != "sphere/norm/all"}
    assert len(layers) == 4 and served.lines(run.name, per_layer["charts"]["norm per layer"]) == layers


@pytest.mark.slow
def test_ddp_on_two_processes_measures_each_step_as_captured(tmp_path):
    """``torchrun --nproc_per_node 2`` (gloo): the main process logs the metrics of the steps it took, against a
    float64 capture; both processes hold the same weights, and both found the same groups."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(__file__).with_name("hf_ddp_run.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(script), str(tmp_path)]  # fmt: skip
    # transformers 4.x's TrainingArguments(torch_compile=True) sets ACCELERATE_DYNAMO_* in this process's
    # environment: an earlier test's would compile the two ranks too
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")} | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for key, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][key]), key
    assert ranks[0]["summary"].splitlines()[0] == ranks[1]["summary"].splitlines()[0]
    logged = ranks[0]["logs"]
    assert len(logged) == 3
    for log, step in zip(logged, (2, 4, 6), strict=True):
        for name in TRACKED:
            x0, x1 = ranks[0]["steps"][step - 1][f"{name}.weight"]
            want = head_angles(x0, x1).square().mean().sqrt().item()
            assert log[f"sphere/angular_update/{name}"] == pytest.approx(want, rel=1e-9), (step, name)


def test_arguments_are_checked_at_construction_and_silence_is_said():
    with pytest.raises(ValueError, match=r"SphereCallback\(`tolerance`\) must be a float in \(0, 1\)"):
        SphereCallback(tolerance=-1)
    with pytest.raises(ValueError, match=r"SphereCallback\(`groups`\)"):
        SphereCallback(groups="autom")
    with pytest.raises(ValueError, match=r"SphereCallback\(`spherical_correction`\)"):
        SphereCallback(spherical_correction="hyper")


def test_a_trainer_that_never_logs_by_steps_is_told(tmp_path):
    with pytest.warns(UserWarning, match='logging_strategy="steps"'):
        train(tmp_path, [SphereCallback()], logging_strategy="epoch")
