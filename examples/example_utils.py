"""What the examples share: the BatchNorm conv block, a fresh log folder per invocation, and the command that
shows it. Plain PyTorch only, so that ``plain_torch.py`` stays free of Lightning."""

from __future__ import annotations

import os
import sys
import time
from collections import OrderedDict
from pathlib import Path

from torch import nn


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Conv → BatchNorm → ReLU: each output channel of the conv is a radially invariant group."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            bn=nn.BatchNorm2d(out_channels),
            relu=nn.ReLU(),
        )
    )


def default_logdir(prefix: str, root: str | Path = "lightning_logs") -> Path:
    """A new folder ``<root>/<prefix>-YYYYmmdd-HHMMSS`` (``-2``, ``-3``, … if one exists): one per invocation."""
    stem = Path(root) / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    logdir, number = stem, 1
    while logdir.exists():
        number += 1
        logdir = stem.with_name(f"{stem.name}-{number}")
    return logdir


def tensorboard_command(logdir: Path) -> str:
    """The command that shows ``logdir``: the ``tensorboard`` next to this Python (a venv's), else on PATH."""
    executable = Path(sys.executable).parent / "tensorboard"
    if not executable.exists():
        return f"tensorboard --logdir {logdir}"
    relative = os.path.relpath(executable)
    return f"{executable if relative.startswith('..') else relative} --logdir {logdir}"
