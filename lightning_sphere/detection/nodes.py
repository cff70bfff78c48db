"""What an autograd node saved of its forward call, typed for the readers of the graph (the scaling walk's rules,
:mod:`~lightning_sphere.detection.parametrized`).

Each autograd node class exposes what its forward saved for the backward pass as ``_saved_<name>`` attributes
(``_saved_dim``, ``_saved_exponent``, ...), generated per operation and absent from ``torch.autograd.graph.Node``'s
annotations: :func:`saved` reads one, typed ``Any``, in one place.
"""

from __future__ import annotations

from typing import Any

from torch.autograd.graph import Node


def saved(node: Node, name: str) -> Any:
    """``node``'s saved attribute ``name`` (``"_saved_dim"``); ``AttributeError`` when its operation saved none."""
    return getattr(node, name)


def signed(dim: int) -> int:
    """A saved dimension as Python sees it: some nodes hand ``-1`` back as an unsigned 64-bit integer."""
    return dim - 2**64 if dim >= 2**63 else dim
