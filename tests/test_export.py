"""couplings export (safetensors + JSON config, or a small .pt) and where pretrained models are looked for."""

from __future__ import annotations

import json

import pytest
import torch

from couplings import checkpoint
from couplings.cli import main

pytest.importorskip("safetensors")


def test_a_safetensors_export_loads_back_to_the_same_model(tmp_path, capsys):
    source = checkpoint.pretrained_path("realnvp-fast-mnist")
    out = tmp_path / "realnvp"
    assert main(["export", str(source), "--format", "safetensors", "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "couplings-safetensors" and config["model"] == "realnvp"
    original, _ = checkpoint.load_model(source)
    exported, payload = checkpoint.load_model(out)  # the directory, as a run directory is given
    assert payload["model_config"] == json.loads(json.dumps(checkpoint.load(source)["model_config"]))
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(exported.log_prob(x), original.log_prob(x), rtol=0, atol=0)
    # The safetensors file holds tensors only: no pickle, no code.
    assert not (out / "model.safetensors").read_bytes().startswith(b"\x80")


def test_a_small_pt_export_and_errors(tmp_path, capsys):
    out = tmp_path / "nice.pt"
    assert main(["export", str(checkpoint.pretrained_path("nice-small-mnist")), "--format", "pt", "-o", str(out), "--half"]) == 0
    assert checkpoint.load(out)["stored_half_precision"] is True
    assert main(["export", str(out), "--half", "-o", str(tmp_path / "x")]) == 2
    assert "--half applies to --format pt only" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(checkpoint.CheckpointError, match="config.json is missing or unreadable"):
        checkpoint.load(tmp_path / "bad")


def test_pretrained_models_are_looked_for_in_the_variable_then_the_package(tmp_path, monkeypatch):
    shipped = checkpoint.pretrained_path("nice-small-mnist")
    monkeypatch.setenv("COUPLINGS_PRETRAINED", str(tmp_path))
    assert checkpoint.pretrained_path("nice-small-mnist") == shipped  # not in the variable's directory: the package's
    (tmp_path / "nice-small-mnist.pt").write_bytes(shipped.read_bytes())
    assert checkpoint.pretrained_path("nice-small-mnist") == tmp_path / "nice-small-mnist.pt"
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.pretrained_path("no-such-model")
    assert str(tmp_path) in str(error.value) and "nice-small-mnist" in str(error.value)
