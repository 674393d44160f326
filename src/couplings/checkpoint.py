"""Checkpoints: atomic writes, safe loads (``weights_only=True``), and rebuilding models."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from couplings.models import MODELS, Flow

__all__ = ["FORMAT_VERSION", "CheckpointError", "build_model", "load", "load_model", "resolve", "save"]

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "model", "model_config", "model_state")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, of another format, or does not fit its model."""


def save(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Writes ``payload`` under a temporary name, syncs it, then renames it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def resolve(path: str | os.PathLike) -> Path:
    """A run directory -> its ``best.pt`` (else ``last.pt``); a file -> itself."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path} is a directory without best.pt or last.pt; expected a run directory")
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint or run directory: {path}")
    return path


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Loads a checkpoint with ``weights_only=True`` (no code in a pickle ever runs) and checks it."""
    path = resolve(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types on foreign bytes (struct.error, EOFError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable couplings checkpoint: {first}") from None
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


def build_model(name: str, model_config: dict[str, Any]) -> Flow:
    """Builds model ``name`` from its config dict (as stored in a checkpoint)."""
    entry = MODELS[name]
    config = entry.config(**model_config)
    return entry.cls(**vars(config))


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Flow, dict[str, Any]]:
    """Rebuilds a model from a checkpoint file or run directory alone.

    Returns:
        The model in eval mode on ``device``, and the checkpoint dict.
    """
    payload = load(path)
    try:
        model = build_model(payload["model"], payload["model_config"])
        model.load_state_dict(payload["model_state"])
    except (TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{resolve(path)}: weights do not fit model {payload['model']!r}: {first}") from None
    return model.to(device).eval(), payload
