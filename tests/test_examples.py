"""The examples run end to end (shortened) and write what they promise."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_torch_loop(tmp_path, capsys):
    scalars = load("plain_torch").main(steps=21, root=tmp_path)
    out = capsys.readouterr().out
    assert "conv1" in out and "bn1 (BatchNorm2d)" in out and "classifier: output is not normalized" in out
    assert scalars["sphere/effective_lr/all"] > 0 and scalars["sphere/angular_update_equilibrium/all"] > 0
    assert list((tmp_path / "plain_torch").glob("events.out.tfevents.*"))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_digits_demo(tmp_path, capsys):
    results = load("digits").main(max_epochs=1, root=tmp_path)
    assert set(results) == {"sgdm", "adam", "adamsrt"}
    for name, result in results.items():
        assert 0 <= result["val/acc"] <= 1
        assert result["sphere/effective_lr/block2.conv"] > 0
        assert list((tmp_path / "digits" / name).glob("events.out.tfevents.*"))
    assert "deformation_cos" in str(results["adam"]) and "deformation_cos" not in str(results["sgdm"])
    assert results["adamsrt"]["sphere/deformation_cos/all"] == pytest.approx(1, abs=1e-6)  # S removes deformation
    assert results["adam"]["sphere/deformation_cos/all"] < 0.999
    assert f"tensorboard --logdir {tmp_path}" in capsys.readouterr().out
