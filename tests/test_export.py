"""couplings export (safetensors + JSON config, or a small .pt) and where pretrained models are looked for."""

from __future__ import annotations

import json

import pytest
import torch

from _require import require
from couplings import checkpoint
from couplings.cli import main
from couplings.likelihood import log_probs, nats_to_bits_per_dim


def test_a_safetensors_export_loads_back_to_the_same_model(tmp_path, capsys):
    require("safetensors", "COUPLINGS_REQUIRE_EXPORT")  # the other tests here do not need it
    source = checkpoint.pretrained_path("realnvp-fast-mnist")
    out = tmp_path / "realnvp"
    assert main(["export", str(source), "--format", "safetensors", "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "couplings-safetensors" and config["model"] == "realnvp"
    original, _ = checkpoint.load_model(source)
    exported, payload = checkpoint.load_model(out)  # the directory, as a run directory is given
    assert payload.model_config == json.loads(json.dumps(checkpoint.load(source).model_config))
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(exported.log_prob(x), original.log_prob(x), rtol=0, atol=0)
    # The safetensors file holds tensors only: no pickle, no code.
    assert not (out / "model.safetensors").read_bytes().startswith(b"\x80")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(checkpoint.CheckpointError, match="config.json is missing or unreadable"):
        checkpoint.load(tmp_path / "bad")


def test_a_small_pt_export_and_errors(tmp_path, capsys):
    out = tmp_path / "nice.pt"
    assert main(["export", str(checkpoint.pretrained_path("nice-small-mnist")), "--format", "pt", "-o", str(out), "--half"]) == 0
    assert checkpoint.load(out).stored_half_precision is True
    assert main(["export", str(out), "--half", "-o", str(tmp_path / "x")]) == 2
    assert "--half applies to --format pt only" in capsys.readouterr().err


def test_a_half_precision_export_scores_like_the_float_model(tmp_path):
    source = checkpoint.pretrained_path("nice-small-mnist")
    out = tmp_path / "nice-half.pt"
    assert main(["export", str(source), "--format", "pt", "-o", str(out), "--half"]) == 0
    stored = checkpoint.load(out).model_state
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    assert out.stat().st_size < 0.6 * source.stat().st_size
    original, _ = checkpoint.load_model(source)
    half, _ = checkpoint.load_model(out)
    assert {p.dtype for p in half.parameters()} == {torch.float32}  # float16 weights, loaded into float32
    # 256 images of the model's own (in distribution, no dataset needed), as 8-bit pixels, each
    # scored by both with the same dequantization noise.
    with torch.no_grad():
        drawn = original.sample(256, generator=torch.Generator().manual_seed(0))
    images = (drawn.clamp(0, 1) * 255).round().to(torch.uint8)
    ours, theirs = log_probs(original, images, seed=0), log_probs(half, images, seed=0)
    assert torch.isfinite(ours).all() and float(ours.mean()) > 1000  # nats: densities the model finds typical
    # Measured (CPU, torch 2.13): at most 0.35 nats per image apart (mean 0.10; a log-density
    # near 1,580 nats), 0.00013 bits/dim apart on the batch; weights rounded to bfloat16 instead
    # are 2.8-3.7 nats apart, a half export that lost a tensor thousands.
    assert float((ours - theirs).abs().max()) < 1.5
    dim = 784
    assert abs(nats_to_bits_per_dim(float(ours.mean()), dim) - nats_to_bits_per_dim(float(theirs.mean()), dim)) < 5e-4
    assert not torch.equal(ours, theirs)  # the weights were rounded: the scores cannot be identical


def test_pretrained_models_are_looked_for_in_the_variable_then_the_package(tmp_path, monkeypatch):
    shipped = checkpoint.pretrained_path("nice-small-mnist")
    monkeypatch.setenv("COUPLINGS_PRETRAINED", str(tmp_path))
    assert checkpoint.pretrained_path("nice-small-mnist") == shipped  # not in the variable's directory: the package's
    (tmp_path / "nice-small-mnist.pt").write_bytes(shipped.read_bytes())
    assert checkpoint.pretrained_path("nice-small-mnist") == tmp_path / "nice-small-mnist.pt"
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.pretrained_path("no-such-model")
    assert str(tmp_path) in str(error.value) and "nice-small-mnist" in str(error.value)
