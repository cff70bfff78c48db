"""The Lightning callback's logic, shared by the ``pytorch_lightning`` and ``lightning.pytorch`` classes
(``lightning_sphere.SphereMonitor``, ``lightning_sphere.lightning.SphereMonitor``).

:mod:`~.monitor` holds the hooks (``SphereMonitorLogic``); every other module here is one collaborator of theirs,
listed, in the order they import each other, in :mod:`~.monitor`'s docstring.
"""
