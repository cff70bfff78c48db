"""The Lightning callback's logic, shared by the ``pytorch_lightning`` and ``lightning.pytorch`` classes
(``lightning_sphere.SphereMonitor``, ``lightning_sphere.lightning.SphereMonitor``)."""
