"""``python -m lightning_sphere plot LOGDIR``: the ``lightning-sphere`` command."""

import sys

from lightning_sphere.reporting.cli import main

if __name__ == "__main__":
    sys.exit(main())
