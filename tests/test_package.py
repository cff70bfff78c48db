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


README = Path(__file__).resolve().parent.parent / "README.md"
#: How the README's "per layer" column words each reduction of the registry.
PER_LAYER = {"rms": "RMS", "mean": "mean", "median": "median", "maxabs": r"max \|·\|"}


def readme_table(heading: str) -> dict[str, list[str]]:
    """The rows of the first table after ``heading``: first cell (without backticks) → the other cells."""
    text = README.read_text().split(heading, 1)[1]
    rows = {}
    for line in text.splitlines():
        if rows and not line.startswith("|"):
            break
        if line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows[cells[0].split("`")[1]] = cells[1:]
    return rows


def test_the_readme_metrics_table_agrees_with_the_metric_registry():
    from lightning_sphere import METRICS
    from lightning_sphere.measurement.metrics import SKIPPED_GROUPS

    rows = readme_table("## Metrics")
    assert set(rows) == {*METRICS, SKIPPED_GROUPS}
    for name, metric in METRICS.items():
        definition, unit, per_layer = rows[name]
        assert (unit, per_layer) == (metric.unit, PER_LAYER[metric.reduction]), name
        assert f"({metric.section})" in definition, name


def test_every_public_name_is_documented():
    import lightning_sphere

    api = README.read_text().split("## API", 1)[1].split("\n## ", 1)[0]
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
