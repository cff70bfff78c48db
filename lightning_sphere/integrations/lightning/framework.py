"""What differs between the two Lightning packages, given to the callback logic by each thin callback class."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Framework:
    """What differs between the two Lightning packages.

    ``pytorch_lightning`` and ``lightning.pytorch`` are mirror packages with distinct classes (see the developers'
    notes): the callback logic raises, tells and warns through these, never through either package directly, so
    that one logic serves both (``lightning_sphere.pytorch_lightning``, ``lightning_sphere.lightning``).
    """

    misconfiguration: type[Exception]
    info: Callable[[str], None]
    warn: Callable[[str], None]
    unsupported_strategies: tuple[type, ...]
    #: strategies that shard the model in ``configure_model``, after ``setup``: groups are looked for at fit start
    sharding_strategies: tuple[type, ...] = ()
    #: a backward pass whose loss the callback was not shown: how it came about, and how to show it
    unseen_backward: str = "that Lightning did not run (`loss.backward()` in manual optimization?)"
    show_backward: str = "Call `self.manual_backward(loss)` instead of `loss.backward()`."
    #: the callback's name, as the messages give it
    callback: str = "SphereMonitor"
