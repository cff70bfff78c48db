"""The two SphereMonitor classes really are Lightning callbacks running SphereMonitorLogic's hooks.

Lightning calls a hook by name and silently skips names it does not know: a typo'd hook, or a base
class whose no-op comes first in the MRO, would leave the monitor quietly doing nothing.
"""

import inspect

import lightning.pytorch as L
import pytest
import pytorch_lightning as pl

from lightning_sphere import lightning as for_lightning
from lightning_sphere import pytorch_lightning as for_pytorch_lightning
from lightning_sphere.integrations.lightning.monitor import SphereMonitorLogic

FLAVOURS = {
    "pytorch_lightning": (for_pytorch_lightning.SphereMonitor, pl.Callback),
    "lightning.pytorch": (for_lightning.SphereMonitor, L.Callback),
}
#: The hooks the monitor needs, from monitor.py's notes on hook order (and checkpointing).
NEEDED = {
    "setup",
    "on_fit_start",
    "on_train_batch_start",
    "on_before_backward",
    "on_before_optimizer_step",
    "on_train_batch_end",
    "teardown",
    "state_dict",
    "load_state_dict",
}


def hook_names(callback: type) -> set[str]:
    """The public callables of a Callback class: its hooks."""
    return {name for name in dir(callback) if not name.startswith("_") and callable(getattr(callback, name))}


def own_methods() -> dict[str, object]:
    return {name: f for name, f in vars(SphereMonitorLogic).items() if inspect.isfunction(f)}


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_every_hook_the_logic_defines_overrides_the_callback_no_op(flavour):
    monitor, callback = FLAVOURS[flavour]
    hooks = hook_names(callback)
    assert hooks >= NEEDED  # the Callback class really has them (so the check below is not vacuous)
    overriding = {name: f for name, f in own_methods().items() if name in hooks}
    assert set(overriding) >= NEEDED
    for name, function in overriding.items():
        assert getattr(monitor, name) is function, name
        assert getattr(monitor, name) is not getattr(callback, name), name
        # Lightning passes hooks their arguments by position: the same number as the Callback's own
        assert len(inspect.signature(function).parameters) == len(inspect.signature(getattr(callback, name)).parameters)


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_every_on_method_of_the_logic_is_a_real_hook(flavour):
    _, callback = FLAVOURS[flavour]
    on_methods = {name for name in own_methods() if name.startswith("on_")}
    assert on_methods >= {n for n in NEEDED if n.startswith("on_")}
    assert on_methods <= hook_names(callback), on_methods - hook_names(callback)


def test_both_classes_are_callbacks_of_their_own_package_with_the_shared_docstring():
    for monitor, callback in FLAVOURS.values():
        assert issubclass(monitor, callback)
        assert issubclass(monitor, SphereMonitorLogic)
        assert monitor.__doc__ == SphereMonitorLogic.__doc__
        assert "spherical dynamics" in monitor.__doc__
    assert not issubclass(for_pytorch_lightning.SphereMonitor, L.Callback)
    assert not issubclass(for_lightning.SphereMonitor, pl.Callback)
