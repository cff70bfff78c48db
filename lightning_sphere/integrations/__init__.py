"""Stage 7, where training frameworks plug in: the Lightning callbacks' shared logic
(:mod:`~lightning_sphere.integrations.lightning`), and the training strategies supported
(:mod:`~lightning_sphere.integrations.strategies`)."""
