import re
import subprocess
import sys
from pathlib import Path


def test_the_plain_pytorch_core_does_not_import_lightning():
    code = (
        "import sys, lightning_sphere\n"
        "assert not {'pytorch_lightning', 'lightning'} & set(sys.modules)\n"
        "assert lightning_sphere.SphereMonitor.__module__ == 'lightning_sphere.pytorch_lightning'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


DOCS = Path(__file__).resolve().parent.parent / "docs"
#: How the charts guide's "per layer" column words each reduction of the registry.
PER_LAYER = {"rms": "RMS", "mean": "mean", "median": "median", "maxabs": r"max \|·\|"}


def page_table(page: str, heading: str) -> dict[str, list[str]]:
    """The rows of the first table after ``heading`` on ``docs/<page>``: first cell (without backticks) → the other
    cells."""
    text = (DOCS / page).read_text(encoding="utf-8").split(heading, 1)[1]
    rows = {}
    for line in text.splitlines():
        if rows and not line.startswith("|"):
            break
        if line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows[cells[0].split("`")[1]] = cells[1:]
    return rows


def test_the_charts_guide_metrics_table_agrees_with_the_metric_registry():
    """The guide's own table, which says more of each metric than the registry's doc line (the reference page's
    table is generated from the registry itself)."""
    from lightning_sphere import METRICS
    from lightning_sphere.measurement.metrics import SKIPPED_GROUPS

    rows = page_table("guides/charts.md", "# Reading the charts")
    assert set(rows) == {*METRICS, SKIPPED_GROUPS}
    for name, metric in METRICS.items():
        definition, unit, per_layer = rows[name]
        assert (unit, per_layer) == (metric.unit, PER_LAYER[metric.reduction]), name
        assert f"({metric.section})" in definition, name


def test_every_public_name_is_documented():
    import lightning_sphere

    api = (DOCS / "reference" / "api.md").read_text(encoding="utf-8").split("\n## ", 1)[0]  # its table
    for name in lightning_sphere.__all__:
        assert f"`{name}`" in api, name
        obj = getattr(lightning_sphere, name)
        if callable(obj):
            assert (obj.__doc__ or "").strip(), name


def test_the_version_is_the_changelogs_newest():
    from pathlib import Path

    import lightning_sphere

    changelog = (Path(__file__).resolve().parent.parent / "CHANGELOG.md").read_text()
    newest = changelog.split("\n## ", 1)[1].split()[0]
    assert lightning_sphere.__version__ == newest
