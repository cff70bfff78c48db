"""MkDocs hook: the reference tables that the package's registries define, generated at build time; and the
docstrings' Sphinx roles shown as code on the API page.

A page that holds the line ``<!-- generated: metrics -->`` gets the metric registry's table
(``lightning_sphere.METRICS``) in its place; ``<!-- generated: optimizers -->`` gets the optimizer registry's
(``lightning_sphere.optimizers.OPTIMIZERS`` and ``BY_PATH``). The tables are read off the registries on every
build, so they cannot drift from the code; ``tests/test_docs_site.py`` checks them too, without MkDocs.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
from collections.abc import Callable
from typing import Any

#: How the tables describe each per-layer reduction of the metric registry.
PER_LAYER = {"rms": "RMS", "mean": "mean", "median": "median", "maxabs": r"max \|·\|"}

#: Hyper-parameters the optimizer table evaluates each registered class at (``weight_decay=0.01`` otherwise), so
#: that the equilibrium column shows a number and SGD appears with and without momentum. Only the examples are
#: written here: every cell is what the registry answers for them.
EXAMPLES: dict[str, list[dict[str, Any]]] = {
    "torch.optim.SGD": [
        {"lr": 0.1, "weight_decay": 5e-4},
        {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
        {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
    ],
    "torch.optim.Adam": [{"lr": 1e-3, "weight_decay": 5e-4}],
    "torch.optim.AdamW": [{"lr": 1e-3, "weight_decay": 0.1}],
    "torch.optim.Muon": [{"lr": 0.02, "weight_decay": 0.1}],
    "torch.optim.LBFGS": [{}],
    "lion_pytorch.lion_pytorch.Lion": [{"lr": 1e-4, "weight_decay": 1.0}],
}


def metrics_table() -> str:
    """The metric registry as a Markdown table, one row per :data:`lightning_sphere.METRICS` entry, in the order the
    metrics are logged, then the ``skipped_groups`` count."""
    from lightning_sphere import METRICS
    from lightning_sphere.measurement.metrics import SKIPPED_GROUPS

    rows = [
        "| metric | definition | unit | per layer | theory | histogram |",
        "|---|---|---|---|---|---|",
    ]
    for name, metric in METRICS.items():
        doc = metric.doc.replace("|", r"\|")
        histogram = "yes" if metric.histogram else "–"
        rows.append(
            f"| `{name}` | {doc} | {metric.unit} | {PER_LAYER[metric.reduction]} | {metric.section} | {histogram} |"
        )
    rows.append(
        f"| `{SKIPPED_GROUPS}` (`all` only, when not zero) | groups left out of this step: zero norm or non-finite "
        "values | count | sum | – | – |"
    )
    return "\n".join(rows)


def _registered() -> list[tuple[str, Any, Any]]:
    """(class path, class or ``None`` when its package is not installed, rule) for every registry entry."""
    from lightning_sphere.optimizers import BY_PATH, OPTIMIZERS, class_path

    entries: list[tuple[str, Any, Any]] = [(class_path(cls), cls, rule) for cls, rule in OPTIMIZERS.items()]
    for path, rule in BY_PATH.items():
        module, _, name = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except ImportError:
            cls = None
        entries.append((path, cls, rule))
    return entries


def _instance(cls: type, kwargs: dict[str, Any]) -> Any:
    import torch

    params = [torch.zeros(4, 4, requires_grad=True)]  # 2-D: Muon steps matrices only
    with contextlib.redirect_stdout(io.StringIO()):  # Prodigy prints its decay mode
        return cls(params, **kwargs)


def _mode_cell(rewrite_for: Callable[..., Any], optimizer: Any, group: dict[str, Any], mode: Any) -> str:
    try:
        return f"`{rewrite_for(optimizer, group, mode).__name__}`"
    except ValueError as err:
        return "with a target" if "give the target" in str(err) else "refused"


def _format(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in kwargs.items()) or "defaults"


def optimizers_table() -> str:
    """The optimizer registry as a Markdown table: for each registered class (and example hyper-parameters), how the
    effective learning rate is obtained, whether a and b come from the optimizer's moments, how its weight decay
    enters, whether an update length is predicted, the equilibrium angle, and the rewrite each correction mode
    picks (``refused``; ``with a target`` where the rotational mode needs ``Rotational(angular_update=...)``), all as
    the registry answers them."""
    from lightning_sphere import Hyperball, Rotational
    from lightning_sphere.optimizers import rewrite_for, rule_of

    modes = {
        '`"srt"`': "srt",
        '`"s"`': "s",
        '`"rt"`': "rt",
        '`"rotational"`': Rotational(),
        '`"hyperball"`': Hyperball(),
    }
    header = ["optimizer", "evaluated at", "effective lr (§3)", "a, b (§2)", "weight decay", "update length (§8)"]
    header += ["equilibrium (rad, §7–§8)", *modes]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for path, cls, base_rule in _registered():
        if cls is None:  # its package is absent: what the rule says without an instance
            cells = [f"`{path}` (not installed here)", "–", "closed form" if base_rule.formula else "measured"]
            cells += ["moments" if base_rule.adaptive else "–"] + ["–"] * (len(header) - 4)
            rows.append("| " + " | ".join(cells) + " |")
            continue
        for kwargs in EXAMPLES.get(path, [{"weight_decay": 0.01}]):
            try:
                optimizer = _instance(cls, kwargs)
            except TypeError:  # no weight_decay argument
                kwargs = {}
                optimizer = _instance(cls, kwargs)
            rule = rule_of(optimizer)
            group = optimizer.param_groups[0]
            in_force = rule.in_force(group, group)
            decay = float(rule.weight_decay(in_force) or 0.0)
            decay_cell = "–" if not decay else "decoupled" if rule.decoupled_decay(in_force) else "in the gradient"
            equilibrium = rule.equilibrium(in_force)
            cells = [
                f"`{path}`",
                _format(kwargs),
                "closed form" if rule.formula else "measured",
                "moments" if rule.adaptive else "–",
                decay_cell,
                "predicted" if rule.update_length is not None else "–",
                "none" if equilibrium is None else f"{equilibrium:.4g}",
            ]
            cells += [_mode_cell(rewrite_for, optimizer, group, mode) for mode in modes.values()]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


GENERATORS = {"metrics": metrics_table, "optimizers": optimizers_table}
_MARKER = re.compile(r"^<!-- generated: (\w+) -->$", re.MULTILINE)


def expand(markdown: str) -> str:
    """``markdown`` with each ``<!-- generated: NAME -->`` line replaced by the table ``GENERATORS[NAME]`` makes."""
    return _MARKER.sub(lambda m: GENERATORS[m[1]](), markdown)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """MkDocs event: every page's Markdown before it is rendered."""
    return expand(markdown)


#: A Sphinx role as mkdocstrings renders a docstring's ``:class:`~pkg.mod.Name``` (the docstrings are also read by
#: ``help()`` and the doctests, which keep them).
_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|obj|exc):<code>(~?)([\w.]+)</code>")


def roles_as_code(html: str) -> str:
    """``html`` with each rendered role shown as its code: ``~pkg.mod.Name`` as ``Name``, as Sphinx would."""
    return _ROLE.sub(lambda m: f"<code>{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}</code>", html)


def on_page_content(html: str, **kwargs: Any) -> str:
    """MkDocs event: every page's HTML once rendered."""
    return roles_as_code(html)
