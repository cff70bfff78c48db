"""The benchmark table on a CUDA machine, plus the host syncs CUDA itself reports. Under 5 minutes.

Runs every benchmark of ``run.py`` on the GPU with shortened settings, then counts the synchronizing CUDA
calls over non-logging steps (``torch.cuda.set_sync_debug_mode``): with the monitor attached, measuring
nothing and correcting every step, a step must not synchronize at all. The count goes into the table.

Usage (from the repository root, with the project installed)::

    python benchmarks/gpu_check.py
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

if not __package__:  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.measure import Row
from benchmarks.models import IMAGE_SHAPE, ResNet18
from benchmarks.run import BENCHMARKS, header, markdown_table, quiet
from benchmarks.settings import Settings
from lightning_sphere import SphereTracker, find_invariant_groups


def cuda_syncs(settings: Settings) -> list[Row]:
    """Synchronizing CUDA calls per non-logging step, as CUDA's own sync debug mode reports them: a plain
    Adam step, then one with the monitor's tracker attached (not armed) and the AdamSRT correction on."""
    rows = []
    for label, correction in (("monitor attached, not measuring", None), ("AdamSRT correction every step", "srt")):
        torch.manual_seed(0)
        model = ResNet18().cuda()
        x = torch.randn(settings.batch_size, *IMAGE_SHAPE, device="cuda")
        y = torch.randint(10, (len(x),), device="cuda")
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        tracker = SphereTracker(find_invariant_groups(model, x), [opt], correction=correction)
        for _ in range(3):  # compile, allocate
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        counts = []
        for _ in range(settings.steps):
            F.cross_entropy(model(x), y).backward()
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    opt.step()  # the optimizer's own step plus everything the monitor hooks into it
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            counts.append(sum("synchroniz" in str(w.message) for w in caught))
            opt.zero_grad()
        tracker.close()
        rows.append(Row(f"CUDA syncs per non-logging optimizer step ({label})", counts, "≤ 0", f"{len(counts)} steps"))
    return rows


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA device")
    quiet()
    settings = Settings("cuda", batch_size=64, correction_batch_size=64, warmup=5, steps=20, repeats=3)
    start = time.perf_counter()
    rows = [row for benchmark in BENCHMARKS.values() for row in benchmark(settings)] + cuda_syncs(settings)
    print(header(settings), end="\n\n")
    print(markdown_table(rows), end="\n\n")
    print(f"Measured in {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
