"""The checkpoint file format: atomic writes, safe loads (``weights_only=True``), rebuilding
models, exports (a small ``.pt``, or safetensors weights beside a JSON config, the format model
hubs use), and the pretrained models shipped inside the package."""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import torch

from couplings.files import atomic_write
from couplings.models import MODELS, Flow, build_model

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "build_model",
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
# 4: an image coupling's scale parameters are its scale function's (`couplings.transforms.coupling_parts`):
#    "scale.factor" and "scale.log_bound" for format 3's "tanh_factor" and "log_bound"; older
#    weights are renamed as they are read.
FORMAT_VERSION = 4
# Weight names that changed, by the format that last wrote them: old name -> new name (last part).
RENAMED = {3: {"tanh_factor": "scale.factor", "log_bound": "scale.log_bound"}}
HEADER = b"couplings-checkpoint"
REQUIRED_KEYS = ("format_version", "model", "model_config", "model_state")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, of another format, or does not fit its model."""


@dataclass
class Checkpoint:
    """What a checkpoint file holds: the one schema every writer and reader of checkpoints uses.

    A run's checkpoints (``last.pt``, ``best.pt``) hold everything to continue training exactly;
    an export (`export_pretrained`) holds the first group and its provenance. `from_payload` reads
    every format couplings has written (1 to `FORMAT_VERSION`); `to_payload` writes the newest,
    under the same keys, so that older releases' files and today's differ only in what they hold.
    """

    # What the weights are.
    model: str
    model_config: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    size: str | None = None
    train: dict[str, Any] = field(default_factory=dict)  # the training options (`couplings.config`)
    hardware: str | None = None
    ema_state: dict[str, torch.Tensor] | None = None  # Polyak averages, for a run with ema_decay
    # How far training got.
    epoch: int = 0  # completed passes (of the current stage, for the latent trainer)
    step: int = 0
    elapsed: float = 0.0  # seconds of training, over every invocation
    # What a resume needs besides the weights (a run's checkpoints only).
    optimizer_state: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None  # `couplings.training.faults.rng_states`; format 1 kept torch's CPU state only
    position: dict[str, Any] | None = None  # inside an interrupted pass (`EpochPass.position`); stored as "pass"
    lr_scale: float = 1.0  # the learning rate's factor after rollbacks
    rollbacks: int = 0
    world_size: int = 1  # processes it was trained on (torchrun)
    best_val_bpd: float | None = None  # pixel trainer: the best validation bits/dim so far
    stage: str | None = None  # latent trainer: "autoencoder" or "flow"
    ae_epoch: int | None = None  # latent trainer: completed autoencoder passes
    best_val_nll: float | None = None  # latent trainer: the best validation NLL of the flow so far
    # Exports.
    provenance: dict[str, Any] | None = None
    stored_half_precision: bool | None = None  # an export's floating-point weights are float16
    format_version: int = FORMAT_VERSION  # of the file it was read from; `to_payload` writes the newest

    # Keys whose name in the file differs from the field's.
    KEYS: ClassVar[dict[str, str]] = {"position": "pass"}

    def weights(self) -> dict[str, torch.Tensor]:
        """The weights to evaluate, sample and export with: the Polyak averages if the run kept
        them, else the trained weights. The one place that choice is made."""
        return self.ema_state or self.model_state

    def description(self) -> dict[str, Any]:
        """What the weights are, as a run's ``config.json`` begins: model, size, model config,
        training options and hardware (those it holds)."""
        values = {"model": self.model, "size": self.size, "model_config": self.model_config, "train": self.train,
                  "hardware": self.hardware}
        return {k: v for k, v in values.items() if v is not None}

    def exported(self, provenance: dict[str, Any] | None = None) -> Checkpoint:
        """What an export keeps: what the weights are, the weights `weights` chooses, how far
        training got, and ``provenance``; no optimizer, random or averaged state."""
        return Checkpoint(self.model, self.model_config, self.weights(), size=self.size, train=self.train,
                          hardware=self.hardware, epoch=self.epoch, step=self.step, elapsed=self.elapsed,
                          provenance=provenance)

    @classmethod
    def from_payload(cls, payload: dict[str, Any], source: str | os.PathLike = "checkpoint") -> Checkpoint:
        """The checkpoint in a loaded file's dict, of any format up to `FORMAT_VERSION`.

        Raises:
            CheckpointError: The dict lacks a required key, is of a newer format, names an unknown
                model, or holds a key of no format.
        """
        missing = [k for k in REQUIRED_KEYS if k not in payload]
        if missing:
            raise CheckpointError(f"{source}: missing keys {missing}; expected a couplings checkpoint")
        version = payload["format_version"]
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(f"{source}: format version {version!r} is newer than this couplings "
                                  f"understands ({FORMAT_VERSION}); upgrade couplings")
        if payload["model"] not in MODELS:
            raise CheckpointError(f"{source}: unknown model {payload['model']!r}; expected one of {sorted(MODELS)}")
        values = dict(payload)
        for key in ("model_state", "ema_state"):
            if values.get(key) is not None:
                values[key] = upgraded_weights(values[key], version)
        if "rng_state" in values:  # format 1
            values["rng"] = {"torch": values.pop("rng_state")}
        by_key = {cls.KEYS.get(f.name, f.name): f.name for f in fields(cls)}
        unknown = sorted(set(values) - set(by_key))
        if unknown:
            raise CheckpointError(f"{source}: unknown keys {unknown} for a format-{version} couplings checkpoint")
        return cls(**{by_key[k]: v for k, v in values.items() if v is not None})

    def to_payload(self) -> dict[str, Any]:
        """The dict a file stores (format `FORMAT_VERSION`): every field that holds something."""
        values = {self.KEYS.get(f.name, f.name): getattr(self, f.name) for f in fields(self)}
        return {**{k: v for k, v in values.items() if v is not None}, "format_version": FORMAT_VERSION}


def upgraded_weights(state: dict[str, torch.Tensor], version: int) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint of format ``version`` under today's names (`RENAMED`)."""
    for since in sorted(v for v in RENAMED if v >= version):
        renamed = RENAMED[since]
        state = {(f"{k.rpartition('.')[0]}." if "." in k else "") + renamed.get(k.rpartition(".")[2], k.rpartition(".")[2]): v
                 for k, v in state.items()}
    return state


def save(ckpt: Checkpoint, path: str | os.PathLike) -> Path:
    """Writes ``ckpt`` in the newest format, behind a header line that holds the archive's
    SHA-256 and length (`couplings.files.atomic_write`)."""
    buffer = io.BytesIO()
    torch.save(ckpt.to_payload(), buffer)
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


def load(path: str | os.PathLike) -> Checkpoint:
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
    return Checkpoint.from_payload(payload, path)


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


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Flow, Checkpoint]:
    """Rebuilds a model from a checkpoint file or run directory alone.

    Returns:
        The model in eval mode on ``device``, and the `Checkpoint`.

    Examples:
        One of the pretrained models shipped in the package:

        >>> from couplings import load_model
        >>> from couplings.checkpoint import pretrained_path
        >>> model, checkpoint = load_model(pretrained_path("nice-small-mnist"))
        >>> type(model).__name__, checkpoint.model, checkpoint.size, model.training
        ('NICE', 'nice', 'small', False)
        >>> model.sample(2).shape
        torch.Size([2, 1, 28, 28])
    """
    ckpt = load(path)
    try:
        model = build_model(ckpt.model, ckpt.model_config)
        model.load_state_dict(ckpt.weights())
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{resolve(path)}: weights do not fit model {ckpt.model!r}: "
                              f"{first_mismatch(e)}") from None
    return model.to(device).eval(), ckpt


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


def export_pretrained(run: str | os.PathLike, path: str | os.PathLike, *, half: bool = False,
                      provenance: dict[str, Any] | None = None) -> Path:
    """Writes a run's best weights (its Polyak averages, if it kept them), without optimizer
    state, as a small checkpoint (`Checkpoint.exported`).

    ``half=True`` stores floating-point tensors in float16 (they load back into float32
    parameters); buffers such as ActNorm flags and permutations keep their dtypes.
    """
    export = load(run).exported(provenance or {})
    if half:
        export.model_state = {k: v.half() if v.is_floating_point() else v for k, v in export.model_state.items()}
    export.stored_half_precision = half
    return save(export, path)


def export_safetensors(run: str | os.PathLike, directory: str | os.PathLike) -> Path:
    """Writes a run's best weights (its Polyak averages, if it kept them) as ``DIRECTORY/model.safetensors``
    and what they are (model, size, model config, training options, step) as ``DIRECTORY/config.json``;
    `load` and `load_model` read the directory back. Needs the ``safetensors`` package."""
    from safetensors.torch import save as save_tensors

    export = load(run).exported()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in export.to_payload().items() if k not in ("model_state", "provenance")}
    atomic_write(directory / SAFETENSORS, save_tensors({k: v.detach().contiguous().clone() for k, v in export.model_state.items()}))
    atomic_write(directory / SAFETENSORS_CONFIG, json.dumps({"format": "couplings-safetensors", **config}, indent=2) + "\n")
    return directory


def _load_safetensors(path: Path) -> Checkpoint:
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
    return Checkpoint.from_payload({**{k: v for k, v in config.items() if k != "format"}, "model_state": state}, path)
