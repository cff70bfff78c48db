"""The GPU path: compiled kernels on CUDA against the CPU float64 references, and no host sync on CUDA.

Tests marked ``cuda`` are skipped without a GPU (``pytest -m cuda`` selects them). Where the body can also
run on the CPU, it is parametrized by device and the CPU case runs the eager kernels, so that the test
code itself is exercised on every machine. The CUDA cases compile the kernels (``compile=True``).
"""

import pytest
import torch

from lightning_sphere import SphereMonitor
from tests.test_correction import CASES, assert_follows_reference
from tests.test_host_sync import OPTIMIZERS as SYNC_OPTIMIZERS
from tests.test_host_sync import fit_windowed
from tests.test_tracker import assert_matches, measured_after_warmup, optimizer_names

# A compiler failure makes the kernels fall back to eager with a warning; here that is an error, so that
# the CUDA cases really test the compiled kernels.
pytestmark = pytest.mark.filterwarnings("error:lightning_sphere. torch.compile failed")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
TRAINER = {"cpu": {"accelerator": "cpu"}, "cuda": {"accelerator": "gpu", "devices": 1}}

#: float32 on the device against float64: the CPU's eager kernels show relative errors of about 2e-7 and
#: absolute ones of about 2e-8 (grad_cos, which is tiny); the GPU sums in another order.
F32_RTOL, F32_ATOL = 1e-5, 1e-7


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", optimizer_names())
def test_tracker_metrics_match_the_float64_reference(name, device, batch, monkeypatch):
    """float32 model and batch on the device; the reference from float64 CPU copies of what each step did."""
    # TF32 convolutions (cuDNN's default) round their inputs to 10 bits, which can push a group's gradient
    # towards the detection's 1e-3 orthogonality tolerance; the measurement itself does not depend on it.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    measurement, captured, _ = measured_after_warmup(
        name, batch, device, torch.float32, compile=device == "cuda", check_step=False
    )
    assert_matches(measurement, captured, rtol=F32_RTOL, atol=F32_ATOL)
    assert measurement.scalars["sphere/skipped_groups/all"] == 0


#: Fewer steps than on the CPU: float64 convolutions on the GPU round differently, and a difference grows
#: with every step (a 1e-14 change of the initial weights, about 60-fold in 30 steps). On the CPU the runs
#: end within 5e-14 of the references; 1e-9 leaves room for the GPU and still catches float32 rounding.
GPU_STEPS, GPU_REL = 30, 1e-9
#: On the CPU, one case of each family keeps the test code exercised (test_correction has them all).
CPU_CASES = [("srt", "adamw-decay", "AdamSRT"), ("rt", "sgdm-decay", "SGDMRT")]


@pytest.mark.parametrize(
    ("mode", "name", "algorithm", "device"),
    [pytest.param(*case, "cuda", marks=pytest.mark.cuda) for case in CASES] + [(*case, "cpu") for case in CPU_CASES],
)
def test_corrections_follow_the_references(mode, name, algorithm, device, tmp_path):
    """The Trainer on the device (float64) follows the §6 references run on the CPU."""
    assert_follows_reference(
        mode, name, algorithm, tmp_path, GPU_STEPS, GPU_REL, compile=device == "cuda", **TRAINER[device]
    )


class SyncDebugMode:
    """CUDA's sync debug mode as a window's switch: while active, any synchronizing CUDA call raises."""

    def __init__(self) -> None:
        self._active = False

    @property
    def active(self) -> bool:
        return self._active

    @active.setter
    def active(self, on: bool) -> None:
        torch.cuda.set_sync_debug_mode("error" if on else "default")
        self._active = on


@pytest.mark.cuda
@pytest.mark.parametrize("monitor", ["none", "measuring", "correcting"])
@pytest.mark.parametrize("optimizer", list(SYNC_OPTIMIZERS.values()), ids=list(SYNC_OPTIMIZERS))
def test_non_logging_steps_do_not_synchronize_the_gpu(tmp_path, optimizer, monitor):
    """Steps 3, 4, 6 and 7 of nine (steps 2, 5 and 8 log) run in sync debug mode "error". Without a
    monitor this checks the harness: Lightning's and torch's own steps synchronize nothing."""
    monitors = []
    if monitor != "none":
        monitors.append(SphereMonitor(log_every_n_steps=3, spherical_correction=monitor == "correcting", compile=True))
    switch = SyncDebugMode()
    try:
        trainer, opened = fit_windowed(
            tmp_path, switch, optimizer, monitors, log_every=3, max_steps=9, **TRAINER["cuda"]
        )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opened == [3, 4, 6, 7]
    assert not switch.active
    if monitors:
        assert monitors[0].groups  # the monitor was really tracking groups during those steps
        assert ("correction" in monitors[0].summary()) == (monitor == "correcting")  # and correcting them
        assert sorted(trainer.logger.sphere()) == [2, 5, 8]  # and measuring the logging steps
