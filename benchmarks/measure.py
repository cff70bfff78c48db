"""What the benchmarks measure with: interleaved timing, peak memory and host-sync counting."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile


@dataclass(frozen=True)
class Row:
    """A table row: one measured value per repeat, the target it must meet, and the numbers behind it."""

    name: str
    values: list[float]
    target: str = ""
    detail: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def met(self) -> str:
        """Whether the median meets the target (``≤ x`` or ``< x``)."""
        if not self.target:
            return ""
        op, bound = self.target.split()
        return "yes" if (self.median <= float(bound) if op == "≤" else self.median < float(bound)) else "no"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    calls: dict[str, Callable[[], Any]], repeats: int, inner: int, device: torch.device
) -> dict[str, list[float]]:
    """Median seconds per call of each callable, one value per repeat.

    The callables take turns, ``inner`` calls each, in the order given and reversed every other repeat, so
    that a drift of the machine's speed hits them all alike.
    """
    medians: dict[str, list[float]] = {name: [] for name in calls}
    for repeat in range(repeats):
        for name in list(calls) if repeat % 2 == 0 else list(calls)[::-1]:
            times = []
            for _ in range(inner):
                synchronize(device)
                start = time.perf_counter()
                calls[name]()
                synchronize(device)
                times.append(time.perf_counter() - start)
            medians[name].append(statistics.median(times))
    return medians


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Bytes allocated by ``fn`` at its peak, beyond what was allocated before (freed or not at the end).

    CUDA: the caching allocator's statistics. CPU: the allocations and frees torch's profiler records.
    """
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    total = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        total += event.self_cpu_memory_usage
        peak = max(peak, total)
    return peak


#: Tensor methods that wait for the device or copy its data to the host.
SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextmanager
def count_syncs() -> Iterator[dict[str, int]]:
    """Count calls of host-syncing tensor methods inside the block (on any device: a CPU run counts what
    would be a sync on a GPU)."""
    calls: dict[str, int] = {}
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def counting(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            calls[name] = calls.get(name, 0) + 1
            return original(tensor, *args, **kwargs)

        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
