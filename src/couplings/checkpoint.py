"""The checkpoint file format: atomic writes, safe loads (``weights_only=True``), rebuilding
models, exports (a small ``.pt``, or safetensors weights beside a JSON config, the format model
hubs use), and the pretrained models shipped inside the package."""

from __future__ import annotations

import hashlib
import io
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from couplings.files import atomic_write
from couplings.models import MODELS, Flow, build_model

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "build_model",
    "evaluation_weights",
    "export_pretrained",
    "export_safetensors",
    "load",
    "load_model",
    "pretrained_path",
    "resolve",
    "save",
    "verified_archive",
]

# The committed pretrained models are package data, so an installed wheel has them too, except
# the ones too large for a wheel (LARGE_PRETRAINED), which are looked for in $COUPLINGS_PRETRAINED.
PRETRAINED = resources.files("couplings") / "pretrained"
LARGE_PRETRAINED = ("nice-mnist",)  # 38 MB: in a source checkout, not in the wheel (see pyproject.toml)
# A safetensors export: a directory with the weights and the JSON that says what they are.
SAFETENSORS, SAFETENSORS_CONFIG = "model.safetensors", "config.json"
# A run directory's checkpoints (`couplings.rundir.RunDir`): the best by validation, the newest,
# and the one before the newest.
BEST, LAST, PREVIOUS = "best.pt", "last.pt", "previous.pt"

# 2: every RNG state ("rng") and the position inside an interrupted epoch ("pass").
# 3: a header line with the SHA-256 and length of the torch archive after it, checked before
#    unpickling (files of formats 1 and 2, such as older pretrained models, still load).
FORMAT_VERSION = 3
HEADER = b"couplings-checkpoint"
REQUIRED_KEYS = ("format_version", "model", "model_config", "model_state")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, of another format, or does not fit its model."""


def save(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Writes ``payload`` with the format version, behind a header line that holds the archive's
    SHA-256 and length (`couplings.files.atomic_write`)."""
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **payload}, buffer)
    archive = buffer.getvalue()
    digest = hashlib.sha256(archive).hexdigest()
    return atomic_write(path, HEADER + f" sha256={digest} bytes={len(archive)}\n".encode() + archive)


def verified_archive(path: Path) -> bytes | Path:
    """The torch archive of a checkpoint file after its checksum is checked (format 3), or the
    path itself for an older file without a header.

    Raises:
        CheckpointError: The file is unreadable, shorter or longer than its header says, or its
            bytes do not match the checksum (a torn copy, bit rot).
    """
    try:
        with open(path, "rb") as f:
            if f.read(len(HEADER)) != HEADER:
                return path
            header = f.readline().decode("ascii", "replace").split()
            archive = f.read()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    fields = dict(item.partition("=")[::2] for item in header)
    if "sha256" not in fields or not fields.get("bytes", "").isdigit():
        raise CheckpointError(f"{path} is damaged: its header is unreadable")
    if len(archive) != int(fields["bytes"]):
        raise CheckpointError(f"{path} is damaged: {len(archive)} bytes after the header, expected {fields['bytes']}")
    if hashlib.sha256(archive).hexdigest() != fields["sha256"]:
        raise CheckpointError(f"{path} is damaged: its bytes do not match the SHA-256 stored with it")
    return archive


def resolve(path: str | os.PathLike) -> Path:
    """A run directory -> its ``best.pt`` (else ``last.pt``); a safetensors export directory ->
    its ``model.safetensors``; a file -> itself."""
    path = Path(path)
    if path.is_dir():
        for name in (BEST, LAST, SAFETENSORS):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path} is a directory without best.pt, last.pt or {SAFETENSORS}; "
                              "expected a run directory or a safetensors export")
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint or run directory: {path}")
    return path


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Loads a checkpoint with ``weights_only=True`` (no code in a pickle ever runs), or a
    safetensors export, and checks it."""
    path = resolve(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    archive = verified_archive(path)
    try:
        source = io.BytesIO(archive) if isinstance(archive, bytes) else archive
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types on foreign bytes (struct.error, EOFError, ...)
        raise CheckpointError(f"{path} is not a readable couplings checkpoint: {_load_failure(e)}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(payload).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: missing keys {missing}; expected a couplings checkpoint")
    if not isinstance(payload["format_version"], int) or payload["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {payload['format_version']!r} is newer than this couplings "
            f"understands ({FORMAT_VERSION}); upgrade couplings"
        )
    if payload["model"] not in MODELS:
        raise CheckpointError(f"{path}: unknown model {payload['model']!r}; expected one of {sorted(MODELS)}")
    return payload


def _load_failure(error: Exception) -> str:
    """The useful line of a torch.load error. A weights-only refusal is reported as such, without
    torch's advice to retry with ``weights_only=False``, which would run the file's code."""
    text = str(error).strip()
    if text.startswith("Weights only load failed"):
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        detail = next((line for line in lines[1:] if not line.startswith(("Please file", "Check the documentation"))), "")
        detail = detail.removeprefix("WeightsUnpickler error:").strip() or "not a plain tensor archive"
        return f"refused by the safe (weights-only) loader: {detail}"
    return text.splitlines()[0] if text else type(error).__name__


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Flow, dict[str, Any]]:
    """Rebuilds a model from a checkpoint file or run directory alone.

    Returns:
        The model in eval mode on ``device``, and the checkpoint dict.

    Examples:
        One of the pretrained models shipped in the package:

        >>> from couplings import load_model
        >>> from couplings.checkpoint import pretrained_path
        >>> model, checkpoint = load_model(pretrained_path("nice-small-mnist"))
        >>> type(model).__name__, checkpoint["model"], checkpoint["size"], model.training
        ('NICE', 'nice', 'small', False)
        >>> model.sample(2).shape
        torch.Size([2, 1, 28, 28])
    """
    payload = load(path)
    try:
        model = build_model(payload["model"], payload["model_config"])
        model.load_state_dict(evaluation_weights(payload))
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{resolve(path)}: weights do not fit model {payload['model']!r}: "
                              f"{first_mismatch(e)}") from None
    return model.to(device).eval(), payload


def evaluation_weights(payload: dict[str, Any]) -> dict[str, Any]:
    """The weights a checkpoint is evaluated, sampled and exported with: its Polyak averages if
    the run kept them (``ema_state``), else its trained weights (``model_state``)."""
    return payload.get("ema_state") or payload["model_state"]


def first_mismatch(error: Exception) -> str:
    """The useful line of a ``load_state_dict`` error: its first line only names the model, the
    next one names the first missing, unexpected or misshapen tensor."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0]


def pretrained_path(name: str) -> Path:
    """The file of a pretrained model, e.g. "nice-mnist": ``$COUPLINGS_PRETRAINED/nice-mnist.pt``
    if that variable is set and the file is there, else the one shipped in the package
    (``couplings/pretrained/``).

    Raises:
        CheckpointError: No such file; the message names every directory looked in.
    """
    chosen = os.environ.get("COUPLINGS_PRETRAINED")
    places = ([Path(chosen)] if chosen else []) + [Path(str(PRETRAINED))]
    for directory in places:
        if (directory / f"{name}.pt").is_file():
            return directory / f"{name}.pt"
    known = sorted({p.stem for d in places if d.is_dir() for p in d.glob("*.pt")})
    hint = ""
    if name in LARGE_PRETRAINED:
        hint = (f"; {name} is too large for the wheel: copy {name}.pt from a source checkout's src/couplings/pretrained/ "
                "into a directory and point $COUPLINGS_PRETRAINED at it")
    looked = " and ".join(str(d) for d in places)
    raise CheckpointError(f"no pretrained model {name!r} in {looked}; available: {', '.join(known) or 'none'}{hint}")


# What an export keeps of a run's checkpoint besides its weights.
_EXPORTED = ("model", "size", "model_config", "train", "hardware", "epoch", "step", "elapsed")


def export_pretrained(run: str | os.PathLike, path: str | os.PathLike, *, half: bool = False,
                      provenance: dict[str, Any] | None = None) -> Path:
    """Writes a run's best weights (its Polyak averages, if it kept them), without optimizer
    state, as a small checkpoint.

    ``half=True`` stores floating-point tensors in float16 (they load back into float32
    parameters); buffers such as ActNorm flags and permutations keep their dtypes.
    """
    payload = load(run)
    state = evaluation_weights(payload)
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    return save({**{k: payload[k] for k in _EXPORTED if k in payload}, "model_state": state,
                 "stored_half_precision": half, "provenance": provenance or {}}, path)



def export_safetensors(run: str | os.PathLike, directory: str | os.PathLike) -> Path:
    """Writes a run's best weights (its Polyak averages, if it kept them) as ``DIRECTORY/model.safetensors``
    and what they are (model, size, model config, training options, step) as ``DIRECTORY/config.json``;
    `load` and `load_model` read the directory back. Needs the ``safetensors`` package."""
    from safetensors.torch import save as save_tensors

    payload = load(run)
    state = evaluation_weights(payload)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"format": "couplings-safetensors", "format_version": FORMAT_VERSION,
              **{k: payload[k] for k in _EXPORTED if k in payload}}
    atomic_write(directory / SAFETENSORS, save_tensors({k: v.detach().contiguous().clone() for k, v in state.items()}))
    atomic_write(directory / SAFETENSORS_CONFIG, json.dumps(config, indent=2) + "\n")
    return directory


def _load_safetensors(path: Path) -> dict[str, Any]:
    """A safetensors export as a checkpoint dict (its config.json beside it says what it holds)."""
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"{path}: reading safetensors needs the safetensors package: pip install safetensors") from None
    config_path = path.with_name(SAFETENSORS_CONFIG)
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: its {config_path.name} is missing or unreadable ({e})") from None
    if config.get("format") != "couplings-safetensors" or config.get("model") not in MODELS:
        raise CheckpointError(f"{config_path} does not describe a couplings model (expected format couplings-safetensors)")
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    return {**{k: v for k, v in config.items() if k != "format"}, "model_state": state}
