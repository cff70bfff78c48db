"""What the user sees, above the engine: the loggers' sinks and selection (:mod:`~lightning_sphere.reporting.sinks`),
the TensorBoard custom-scalars layout (:mod:`~lightning_sphere.reporting.layout`), the summary table
(:mod:`~lightning_sphere.reporting.summary`), the logged runs read back (:mod:`~lightning_sphere.reporting.runs`),
and the figures and their command line (:mod:`~lightning_sphere.reporting.plot`,
:mod:`~lightning_sphere.reporting.cli`, which need the ``plot`` extra)."""
