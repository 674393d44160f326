"""Real NVP and Glow through the command line on a synthetic dataset."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from couplings import checkpoint, data
from couplings.cli import main
from couplings.likelihood import bits_per_dim


@pytest.mark.parametrize("model", ["realnvp", "glow"])
def test_train_eval_sample_interpolate(model, tiny_dataset, tmp_path, capsys):
    run = tmp_path / model
    argv = ["train", model, "--out", str(run), "--dataset", "tiny", "--set", "size=small", "--set", "hidden=4",
            "--set", "val_size=50", "--set", "samples_per_epoch=4", "--max-steps", "3", "--batch-size", "16",
            "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["size"] == "small" and config["model_config"]["hidden"] == 4
    assert checkpoint.load(run / "last.pt").step == 3

    assert main(["eval", str(run), "--samples", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    result = json.loads((run / "eval.json").read_text())["test"]
    trained, _ = checkpoint.load_model(run)
    assert "bits/dim" in out and result["bits_per_dim"] == pytest.approx(
        bits_per_dim(trained, data.load("tiny", "test")[0], seed=0), abs=1e-6)
    assert result["reconstruction_max_abs_error"] < 1e-4

    sweep = tmp_path / "sweep.png"
    assert main(["sample", str(run), "--temperatures", "0.5,0.7,0.85,1.0", "-n", "3", "-o", str(sweep)]) == 0
    assert Image.open(sweep).size[1] > Image.open(sweep).size[0]  # 4 rows of 3
    strip = tmp_path / "interp.png"
    assert main(["interpolate", str(run), "--pairs", "2", "--steps", "5", "-o", str(strip)]) == 0
    width, height = Image.open(strip).size
    assert width > 2 * height  # 2 rows of 5


def test_bad_temperature_lists(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["sample", "RUN", "-o", str(tmp_path / "x.png"), "--temperatures", "0.5,-1"])
    assert info.value.code == 2 and "expected temperatures > 0" in capsys.readouterr().err
