"""How much each benchmark measures, and where."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Settings:
    """How much to measure, and where.

    ``batch_size`` is the Trainer benchmarks' batch; ``correction_batch_size`` the end-to-end correction
    benchmark's (the target is stated for ResNet-18 at batch 64). ``steps`` timed steps (or calls) per run
    after ``warmup`` untimed ones, in ``repeats`` interleaved rounds.
    """

    device: str = "cpu"
    batch_size: int = 16
    correction_batch_size: int = 64
    warmup: int = 3
    steps: int = 10
    repeats: int = 5

    @classmethod
    def defaults(cls, device: str = "cpu", quick: bool = False) -> Settings:
        """Defaults for ``device``: minutes on a 2-core CPU; ``quick`` is a smoke run."""
        if quick:
            return cls(device, batch_size=4, correction_batch_size=8, warmup=1, steps=3, repeats=2)
        if device == "cuda":
            return cls(device, batch_size=64, warmup=10, steps=50, repeats=7)
        return cls(device)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)
