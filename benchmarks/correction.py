"""What the spherical corrections cost: AdamSRT end to end against plain Adam, the rotational and hyperball modes
(docs/theory.md §9) against plain AdamW, and AdamSRT's optimizer step against plain Adam's and AdamP's (pip
``adamp``, the peer that also treats scale-invariant weights)."""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.measure import Row, interleaved
from benchmarks.models import IMAGE_SHAPE, ResNet18
from benchmarks.settings import Settings
from lightning_sphere import SphereTracker, find_invariant_groups


def _model(settings: Settings, batch_size: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    device = settings.torch_device
    torch.manual_seed(0)
    model = ResNet18().to(device)
    x = torch.randn(batch_size, *IMAGE_SHAPE, device=device)
    return model, x, torch.randint(10, (batch_size,), device=device)


#: End-to-end runs: name → (optimizer factory, correction); each corrected run is compared with its plain one.
_RUNS: dict[str, tuple[Callable[..., torch.optim.Optimizer], str | None]] = {
    "adam": (lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=5e-4), None),
    "adamsrt": (lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=5e-4), "srt"),
    "adamw": (lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05), None),
    "rotational": (lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05), "rotational"),
    "hyperball": (lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05), "hyperball"),
}
#: corrected run → (plain run, label)
_COMPARED = {
    "adamsrt": ("adam", "correction every step (AdamSRT) / plain Adam"),
    "rotational": ("adamw", "rotational AdamW (§9.1) / plain AdamW"),
    "hyperball": ("adamw", "hyperball AdamW, AdamH (§9.2) / plain AdamW"),
}


def end_to_end(settings: Settings) -> list[Row]:
    """Training-step time (forward, backward, step) with each correction on every step / its plain optimizer."""
    runs: dict[str, Callable[[], None]] = {}
    for name, (make, correction) in _RUNS.items():
        model, x, y = _model(settings, settings.correction_batch_size)
        opt = make(model.parameters())
        if correction:
            SphereTracker(find_invariant_groups(model, x), [opt], correction=correction, warn=lambda message: None)

        def step(model: torch.nn.Module = model, opt: torch.optim.Optimizer = opt, x=x, y=y) -> None:
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()

        for _ in range(max(settings.warmup, 2)):  # compiles the correction's kernels
            step()
        runs[name] = step
    times = interleaved(runs, settings.repeats, settings.steps, settings.torch_device)
    rows = []
    for corrected, (plain, label) in _COMPARED.items():
        ratios = [a / b for a, b in zip(times[corrected], times[plain], strict=True)]
        detail = f"{1e3 * statistics.median(times[corrected]):.1f} ms / {1e3 * statistics.median(times[plain]):.1f} ms"
        rows.append(Row(f"{label}, end to end at batch {settings.correction_batch_size}", ratios, "≤ 1.05", detail))
    print("correction: end to end done", file=sys.stderr, flush=True)
    return rows


def optimizer_step(settings: Settings) -> list[Row]:
    """The optimizer step alone (fixed gradients): AdamSRT (torch Adam + correction) / AdamP, and / Adam; the
    rotational and hyperball modes over AdamW / plain AdamW (their copy of x_k and two passes, nothing else)."""
    steps: dict[str, Callable[[], object]] = {}
    for name in ("adam", "adamsrt", "adamp", "adamw", "rotational", "hyperball"):
        model, x, y = _model(settings, 8)
        groups = find_invariant_groups(model, x)
        F.cross_entropy(model(x), y).backward()
        if name == "adamp":
            from adamp import AdamP

            opt = AdamP(model.parameters(), lr=1e-3, weight_decay=5e-4)
        else:
            opt = _RUNS[name][0](model.parameters())
            if _RUNS[name][1]:
                SphereTracker(groups, [opt], correction=_RUNS[name][1], warn=lambda message: None)
        for _ in range(max(settings.warmup, 2)):
            opt.step()
        steps[name] = opt.step
    times = interleaved(steps, settings.repeats, settings.steps, settings.torch_device)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    print("correction: optimizer step done", file=sys.stderr, flush=True)

    def row(label: str, a: str, b: str, target: str = "") -> Row:
        ratios = [x / y for x, y in zip(times[a], times[b], strict=True)]
        return Row(label, ratios, target, f"{ms[a]:.1f} ms / {ms[b]:.1f} ms")

    return [
        row("optimizer step: Adam + AdamSRT correction / AdamP", "adamsrt", "adamp", "< 1"),
        row("optimizer step: Adam + AdamSRT correction / plain Adam", "adamsrt", "adam"),
        row("optimizer step: AdamW + rotational / plain AdamW", "rotational", "adamw"),
        row("optimizer step: AdamW + hyperball / plain AdamW", "hyperball", "adamw"),
    ]
