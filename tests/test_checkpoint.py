"""Checkpoints: atomic writes, safe loading, and clear errors for anything that is not ours."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from couplings import checkpoint
from couplings.checkpoint import CheckpointError
from couplings.models import NICE


def _payload(**extra):
    model = NICE(dim=4, couplings=2, hidden_layers=1, hidden_units=4)
    return checkpoint.Checkpoint("nice", asdict(model.config), model.state_dict(), **extra)


def test_round_trip_and_no_temporary_files(tmp_path):
    checkpoint.save(_payload(epoch=3), tmp_path / "last.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    model, state = checkpoint.load_model(tmp_path)  # a run directory resolves to its checkpoint
    assert state.epoch == 3 and state.format_version == checkpoint.FORMAT_VERSION
    assert not model.training


def test_resolve_prefers_best(tmp_path):
    checkpoint.save(_payload(), tmp_path / "last.pt")
    checkpoint.save(_payload(), tmp_path / "best.pt")
    assert checkpoint.resolve(tmp_path).name == "best.pt"


@pytest.mark.parametrize(
    "content, message",
    [
        (os.urandom(1000), "not a readable couplings checkpoint"),
        (b"", "not a readable couplings checkpoint"),
    ],
)
def test_garbage_is_refused(tmp_path, content, message):
    (tmp_path / "x.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load(tmp_path / "x.pt")


def test_truncated_file_is_refused(tmp_path):
    checkpoint.save(_payload(), tmp_path / "x.pt")
    blob = (tmp_path / "x.pt").read_bytes()
    (tmp_path / "x.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match=r"x.pt is damaged: \d+ bytes after the header, expected \d+"):
        checkpoint.load(tmp_path / "x.pt")


def test_newer_format_missing_keys_and_unknown_model(tmp_path):
    torch.save({**_payload().to_payload(), "format_version": 99}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="format version 99 is newer"):
        checkpoint.load(tmp_path / "new.pt")
    torch.save({"format_version": 1, "model": "nice"}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \['model_config', 'model_state'\]"):
        checkpoint.load(tmp_path / "partial.pt")
    torch.save({**_payload().to_payload(), "format_version": 1, "model": "maf"}, tmp_path / "maf.pt")
    with pytest.raises(CheckpointError, match="unknown model 'maf'"):
        checkpoint.load(tmp_path / "maf.pt")


def test_weights_of_another_shape_are_refused(tmp_path):
    payload = _payload()
    payload.model_config["hidden_units"] = 8
    checkpoint.save(payload, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="weights do not fit model 'nice'"):
        checkpoint.load_model(tmp_path / "x.pt")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_carrying_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format_version": 1, "model": "nice", "payload": _Exploit(marker)}, f, protocol=2)
    with pytest.raises(CheckpointError, match="not a readable couplings checkpoint"):
        checkpoint.load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint or run directory"):
        checkpoint.load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="without best.pt, last.pt or model.safetensors"):
        checkpoint.load(tmp_path)


def test_pretrained_models_are_found_from_an_installed_wheel(tmp_path):
    """Built as a wheel and installed (not editable) into a bare folder, couplings finds its
    pretrained models inside the installed package, with no source checkout to lean on."""
    root = Path(__file__).resolve().parents[1]
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(root)],
                   check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = wheels.glob("couplings-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, capture_output=True)
    code = ("import couplings.checkpoint as c; p = c.pretrained_path('glow-cond-mnist'); "
            "m, s = c.load_model(p); print(p, type(m).__name__, s.provenance['test_bits_per_dim'])")
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("COUPLINGS_PRETRAINED", None)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env,
                         cwd=tmp_path).stdout.split()
    shipped = checkpoint.load(root / "src/couplings/pretrained/glow-cond-mnist.pt").provenance["test_bits_per_dim"]
    assert Path(out[0]).is_relative_to(target) and out[1] == "Glow" and float(out[2]) == pytest.approx(shipped, abs=1e-12)


# --- The schema ---------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def test_a_format_1_checkpoint_reads_into_the_schema_and_resumes_its_random_stream(tmp_path):
    """Format 1 kept torch's CPU random state alone, as ``rng_state``, and no "pass" position."""
    from couplings.training.faults import set_rng_states

    torch.manual_seed(5)
    stream = torch.get_rng_state()
    expected = torch.rand(3)
    torch.save({**_payload(epoch=2, step=7).to_payload(), "format_version": 1, "rng_state": stream}, tmp_path / "old.pt")
    old = checkpoint.load(tmp_path / "old.pt")
    assert (old.format_version, old.epoch, old.step, old.position) == (1, 2, 7, None)
    set_rng_states(old.rng)
    assert torch.equal(torch.rand(3), expected)


def test_the_schema_round_trips_and_refuses_keys_of_no_format(tmp_path):
    ckpt = _payload(epoch=1, step=4, position={"index": 2, "next": 1}, best_val_bpd=1.5, ema_state={})
    payload = ckpt.to_payload()
    assert payload["pass"] == {"index": 2, "next": 1} and "position" not in payload and "provenance" not in payload
    assert checkpoint.Checkpoint.from_payload(payload) == ckpt
    with pytest.raises(CheckpointError, match=r"unknown keys \['optimiser'\]"):
        checkpoint.Checkpoint.from_payload({**payload, "optimiser": {}})
    assert ckpt.weights() is ckpt.model_state  # empty averages: the trained weights
    ckpt.ema_state = {"w": torch.ones(1)}
    assert ckpt.weights() is ckpt.ema_state and ckpt.exported().model_state is ckpt.ema_state


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in [
    *ROOT.glob("results/**/*.pt"), *ROOT.glob("src/couplings/pretrained/*.pt")]))
def test_every_committed_checkpoint_reads_into_the_schema(path):
    """Every committed checkpoint (pretrained models, runs still being resumed) reads, and its
    weights (and averages) fit today's model of its config exactly."""
    ckpt = checkpoint.load(ROOT / path)
    assert 1 <= ckpt.format_version <= checkpoint.FORMAT_VERSION and ckpt.model_state
    assert checkpoint.Checkpoint.from_payload(ckpt.to_payload()).step == ckpt.step
    model = checkpoint.build_model(ckpt.model, ckpt.model_config)
    for weights in (ckpt.model_state, ckpt.ema_state or {}):
        if weights:
            model.load_state_dict(weights)  # strict: no name missing or unknown


def test_format_3_weights_load_under_the_scale_functions_names(tmp_path):
    """Format 3 kept an image coupling's scale parameters as its own (``tanh_factor``,
    ``log_bound``); format 4 keeps them under its scale function (``scale.factor``,
    ``scale.log_bound``). A format-3 file loads into today's model with the same values, and its
    parameters' order, which an optimizer state follows, is the same as before the rename."""
    from couplings.models import Glow, RealNVP

    for model in (RealNVP(image_shape=(1, 8, 8), scales=1, per_scale=2, hidden=4, blocks=1),
                  Glow(image_shape=(1, 8, 8), levels=1, steps=1, hidden=4, blocks=0, scale="bounded")):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.rand_like(p))
        state = model.state_dict()
        old_names = {k.replace("scale.factor", "tanh_factor").replace("scale.log_bound", "log_bound"): v
                     for k, v in state.items()}
        assert old_names.keys() != state.keys()
        name = "realnvp" if isinstance(model, RealNVP) else "glow"
        torch.save({"format_version": 3, "model": name, "model_config": asdict(model.config), "model_state": old_names,
                    "ema_state": old_names}, tmp_path / f"{name}.pt")
        ckpt = checkpoint.load(tmp_path / f"{name}.pt")
        assert ckpt.model_state.keys() == ckpt.ema_state.keys() == state.keys()
        assert list(checkpoint.upgraded_weights(dict.fromkeys(old_names), 3)) == list(state)  # the same order
        loaded, _ = checkpoint.load_model(tmp_path / f"{name}.pt")
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
