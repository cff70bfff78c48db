"""Detection on real architectures against the functional ground truth: one markdown row per model.

Needs the ``zoo`` extra (torchvision, timm, transformers); every model is built from code with random
weights (no download). Not a test: it prints what ``tests/test_real_models.py`` asserts (zero false
positives) and what it only reports (recall). Columns:

- invariant real / tiny eps: Conv, ConvTranspose, Linear and Embedding modules the ground truth finds invariant with
  the model's own eps on the example input / with every eps tiny (structurally);
- detected: modules ``find_invariant_groups`` returns (zero-initialized parameters randomized first), and as
  built; recall: detected / invariant at real eps;
- FN: invariant at real eps but not detected (the package's reasons are listed under the table);
- FP: detected, but scaling the detected groups moves the output (eps tiny), after randomizing and as built;
- wrong gran.: detected with coarser groups than the finest invariant ones;
- gap: the ground truth's largest output change among invariant tests / smallest among failed ones.

Usage::

    python benchmarks/detection_table.py                   # all models, ~10 minutes on 2 cores
    python benchmarks/detection_table.py tv_resnet50 hf_qwen3 --modules   # name every missed module
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.real_models import MODELS, Comparison, available, compare


def table(rows: list[Comparison]) -> str:
    lines = [
        "| model | invariant real eps | invariant tiny eps | detected | recall | detected as built | FN | FP "
        "| FP as built | wrong gran. | detection s | gap (inv. max / fail min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        real = set(r.invariant_real)
        lines.append(
            f"| {r.model} | {len(r.invariant_real)} | {len(r.invariant_tiny)} | {len(r.detected)} | {r.recall:.0%} "
            f"| {len(real & set(r.built_detected))} of {len(real)} | {len(r.false_negatives)} "
            f"| {len(r.false_positives)} | {len(r.built_false_positives)} | {len(r.wrong_granularity)} "
            f"| {r.seconds:.2f} | {r.gap[0]:.0e} / {r.gap[1]:.0e} |"
        )
    real = sum(len(r.invariant_real) for r in rows)
    missed = sum(len(r.false_negatives) for r in rows)
    built = sum(len(set(r.invariant_real) & set(r.built_detected)) for r in rows)
    lines.append(
        f"| **all {len(rows)}** | {real} | {sum(len(r.invariant_tiny) for r in rows)} "
        f"| {sum(len(r.detected) for r in rows)} | {1 - missed / max(real, 1):.1%} | {built} of {real} | {missed} "
        f"| {sum(len(r.false_positives) for r in rows)} | {sum(len(r.built_false_positives) for r in rows)} "
        f"| {sum(len(r.wrong_granularity) for r in rows)} | {sum(r.seconds for r in rows):.1f} | |"
    )
    return "\n".join(lines)


def details(rows: list[Comparison], modules: bool = False) -> str:
    """False negatives grouped by reason (with a count per model, or every module), then every false positive
    and wrong grouping."""
    out = ["", "False negatives by reason:"]
    reasons: dict[str, Counter] = {}
    for r in rows:
        for module, reason in r.false_negatives.items():
            reasons.setdefault(reason, Counter())[f"{r.model}:{module}" if modules else r.model] += 1
    for reason, models in sorted(reasons.items(), key=lambda kv: -sum(kv[1].values())):
        listed = ", ".join(m if modules else f"{m} {n}" for m, n in models.items())
        out.append(f"- {sum(models.values())} × {reason}: {listed}")
    for r in rows:
        for module, change in {**r.false_positives, **r.built_false_positives}.items():
            out.append(f"FALSE POSITIVE {r.model} {module}: scaling its groups moves the output by {change:.1e}")
        for module, why in r.wrong_granularity.items():
            out.append(f"wrong granularity {r.model} {module}: {why}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help=f"default: all of {', '.join(MODELS)}")
    parser.add_argument("--modules", action="store_true", help="name every false negative, not a count per model")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = []
    for name in args.models or list(MODELS):
        if not available(MODELS[name].library):
            print(f"skipped {name}: {MODELS[name].library} is not installed", file=sys.stderr)
            continue
        rows.append(compare(name))
        print(f"{name}: done", file=sys.stderr, flush=True)
    print(table(rows))
    print(details(rows, args.modules))


if __name__ == "__main__":
    main()
