"""Where training frameworks plug in, above everything else: the Lightning callbacks' shared logic
(:mod:`~lightning_sphere.integrations.lightning`), and the training strategies supported
(:mod:`~lightning_sphere.integrations.strategies`)."""
