"""SphereCallback for Lightning Fabric loops: ``from lightning_sphere.fabric import SphereCallback``."""

from lightning_sphere.integrations.fabric import SphereCallback

__all__ = ["SphereCallback"]
