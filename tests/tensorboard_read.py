"""What TensorBoard serves for a log directory, read with its own code: the custom-scalars layout merged over the
runs (its Custom Scalars tab's ``/layout`` request) and the tags each chart draws for a run (``/scalars``)."""

from __future__ import annotations

import json
from pathlib import Path


class Served:
    """TensorBoard's custom-scalars and scalars plugins over ``logdir``, as ``tensorboard --logdir`` loads them."""

    def __init__(self, logdir: str | Path) -> None:
        from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
        from tensorboard.plugins import base_plugin
        from tensorboard.plugins.custom_scalar.custom_scalars_plugin import CustomScalarsPlugin
        from tensorboard.plugins.scalar.scalars_plugin import ScalarsPlugin

        multiplexer = plugin_event_multiplexer.EventMultiplexer()
        multiplexer.AddRunsFromDirectory(str(logdir))
        multiplexer.Reload()
        plugins: dict = {}
        provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
        context = base_plugin.TBContext(
            logdir=str(logdir), multiplexer=multiplexer, data_provider=provider, plugin_name_to_instance=plugins
        )
        plugins["scalars"] = ScalarsPlugin(context)
        self.plugin = CustomScalarsPlugin(context)
        self.runs = sorted(multiplexer.Runs())

    def layout(self) -> list[dict]:
        """The categories as the tab gets them: ``[{"title", "closed", "charts": {title: [tag regex, …]}}]``."""
        from tensorboard import context

        served = self.plugin.layout_impl(context.RequestContext(), "")
        served = json.loads(served) if isinstance(served, str) else served
        return [
            {
                "title": category["title"],
                "closed": category.get("closed", False),
                "charts": {c["title"]: c["multiline"]["tag"] for c in category["chart"]},
            }
            for category in served.get("category", [])
        ]

    def lines(self, run: str, regexes: list[str]) -> set[str]:
        """The tags of ``run`` a chart with these ``regexes`` draws (a line each)."""
        from tensorboard import context

        found: set[str] = set()
        for regex in regexes:
            answer = self.plugin.scalars_impl(context.RequestContext(), run, regex, "")
            assert answer["regex_valid"], regex
            found |= set(answer["tag_to_events"])
        return found
