"""SphereMonitor for ``lightning.pytorch`` Trainers: ``from lightning_sphere.lightning import SphereMonitor``."""

from lightning.pytorch import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_sphere.integrations.lightning.monitor import Framework, SphereMonitorLogic


class SphereMonitor(SphereMonitorLogic, Callback):
    __doc__ = SphereMonitorLogic.__doc__
    _framework = Framework(
        MisconfigurationException,
        rank_zero_info,
        rank_zero_warn,
        (FSDPStrategy, DeepSpeedStrategy),
        (ModelParallelStrategy,),
    )
