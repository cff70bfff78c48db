"""SphereMonitor for ``pytorch_lightning`` Trainers (also ``lightning_sphere.SphereMonitor``)."""

from pytorch_lightning import Callback
from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

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
