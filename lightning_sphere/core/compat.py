"""What the package uses of torch releases newer than its floor, in one place.

The floor (``torch>=2.6`` in pyproject.toml) is the oldest release whose APIs the code needs everywhere: an autograd
node's ``_input_metadata`` and ``Module.register_state_dict_post_hook`` (2.5), ``torch.compiler.set_stance`` (2.6).
What needs a newer release is listed in :data:`GATED` and reached through :func:`api` or :func:`supported`, so
that on an older torch the feature is left out or refused with the release to install, never an
``AttributeError`` in the middle of training. ``tests/test_versions.py`` checks the list against the running torch
and the package's source (a use of a gated API outside this module fails it); ``.ci/versions`` runs the suite on
the floor and on the newest releases (docs/development.md records what passed).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any

import torch

#: The oldest torch the package supports (pyproject.toml says the same; a test checks it).
TORCH_FLOOR = "2.6"


@dataclass(frozen=True)
class Gated:
    """A feature that needs a torch newer than the floor."""

    #: what it is
    name: str
    #: the first torch release it works with
    since: str
    #: what in this package needs it
    used_for: str
    #: what happens on an older torch
    without: str
    #: the API it needs, as a dotted path, when one tells (its absence is the test)
    path: str | None = None
    #: why an older torch will not do, when no missing API says it
    why: str = ""


#: The features newer than the torch floor, by key.
GATED: dict[str, Gated] = {
    "muon": Gated(
        "torch.optim.Muon",
        "2.9",
        "torch's Muon in the optimizer registry (docs/theory.md §8.2)",
        "not registered: there is no such optimizer; another Muon can be registered with register_muon",
        path="torch.optim.Muon",
    ),
    "fsdp2": Gated(
        "FSDP2 (fully_shard)",
        "2.9",
        "measuring and correcting parameters that fully_shard shards",
        "refused (SphereMonitor at fit start, SphereTracker when built)",
        why="on torch 2.7.1 and 2.8.0 the test suite's FSDP2 runs did not match one process (AdamW's effective lr "
        "half of it on two ranks), from 2.9 they do",
    ),
}


def release(version: str | None = None) -> tuple[int, ...]:
    """``(major, minor, patch)`` of ``version`` (default: the running torch's), local tags left out."""
    text = version if version is not None else str(torch.__version__)
    match = re.match(r"\d+(?:\.\d+)*", text)
    return tuple(int(part) for part in match.group().split(".")) if match else ()


def supported(key: str) -> bool:
    """Whether the running torch has the gated feature ``key`` (a key of :data:`GATED`).

    Raises:
        KeyError: for a feature not listed (list it, with the release it needs).
    """
    gated = GATED[key]
    return release() >= release(gated.since) and (gated.path is None or resolve(gated.path) is not None)


def refusal(key: str) -> str:
    """Why the gated feature ``key`` is not available here, with the release to install."""
    gated = GATED[key]
    why = f" ({gated.why})" if gated.why else ""
    return f"{gated.name} needs torch >= {gated.since} for {gated.used_for}{why}; this is torch {torch.__version__}"


def api(key: str) -> Any | None:
    """The API of the gated feature ``key``, ``None`` where the running torch lacks it."""
    gated = GATED[key]
    return resolve(gated.path) if gated.path is not None and supported(key) else None


def resolve(path: str) -> Any | None:
    """The object at a dotted ``path`` (modules imported as needed), ``None`` if the running torch lacks it."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            found = getattr(found, name, None)
            if found is None:
                return None
        return found
    return None
