"""SphereMonitor for ``lightning.pytorch`` Trainers: ``from lightning_sphere.lightning import SphereMonitor``.

The ``lightning`` package is not a dependency (``pytorch-lightning`` is): its floor, the same as pytorch-lightning's
(2.5; docs/development.md#versions), is checked here, on import."""

import lightning
from lightning.pytorch import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_sphere.core.compat import release
from lightning_sphere.integrations.lightning.monitor import Framework, SphereMonitorLogic

if release(lightning.__version__) < (2, 5):
    raise ImportError(
        f"lightning_sphere.lightning needs lightning >= 2.5 (2.4 resumes a fit one step off); this is lightning "
        f"{lightning.__version__}: pip install 'lightning>=2.5'"
    )


class SphereMonitor(SphereMonitorLogic, Callback):
    __doc__ = SphereMonitorLogic.__doc__
    _framework = Framework(
        MisconfigurationException,
        rank_zero_info,
        rank_zero_warn,
        (FSDPStrategy, DeepSpeedStrategy),
        (ModelParallelStrategy,),
    )
