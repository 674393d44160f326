"""Training options (common, pixel-space and latent) and ``--set key=value`` overrides, parsed
against dataclass field types. Imports nothing but the standard library."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, fields
from typing import Any

__all__ = [
    "PRECISIONS",
    "SEEDS",
    "ConfigError",
    "GlowTrainConfig",
    "LatentTrainConfig",
    "PixelTrainConfig",
    "RealNVPTrainConfig",
    "TrainConfig",
    "apply_overrides",
    "format_value",
    "from_stored",
    "option_lines",
    "parse_value",
    "split_overrides",
]


class ConfigError(ValueError):
    """An override names an unknown key or gives a value of the wrong type or range."""


# The values some options take, shared with the command line's checks.
PRECISIONS = ("fp32", "bf16", "auto")  # TrainConfig.precision (RealNVP and Glow)
SEEDS = 2**32  # a seed is in [0, SEEDS)


@dataclass
class TrainConfig:
    """The options every trainer reads: data, budget, optimizer, checkpoints and fault handling.

    The defaults are NICE's paper protocol on MNIST: Adam with lr 1e-3, betas (0.9, 0.99) and
    eps 1e-4 (the paper's "beta2 = 0.01" is written in the old 1 - beta convention); batch 200;
    the last ``val_size`` training images are the validation set that picks ``best.pt``.
    Whether ``dataset`` names a known dataset is checked when a run is planned
    (`couplings.training.plan_run`), where the dataset registry is at hand.
    """

    dataset: str = "mnist"
    epochs: int = 1500
    max_steps: int | None = None
    max_minutes: float | None = None
    batch_size: int = 200
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-4
    weight_decay: float = 0.0
    val_size: int = 10_000
    seed: int = 0
    shuffle: bool = True  # False: every pass takes the training images in their stored order
    grad_clip: float | None = None  # clip the gradient's global norm at this (none: no clipping)
    warmup_steps: int = 0  # linear learning-rate warm-up over this many steps
    lr_schedule: str = "constant"  # after the warm-up: "constant", "exponential" or "cosine"
    lr_decay: float = 0.99  # "exponential": the learning rate's factor per epoch
    schedule_steps: int | None = None  # "cosine": steps to decay to 0 over (none: every epoch's steps)
    checkpoint_every: int | None = None  # also write last.pt every this many steps inside an epoch
    max_bad_steps: int = 10  # consecutive non-finite steps skipped before rolling back
    max_rollbacks: int = 1  # rollbacks to last.pt before giving up with an error
    rollback_lr_factor: float = 0.5  # the learning rate is multiplied by this at each rollback

    def __post_init__(self):
        if not 0 <= self.seed < SEEDS:
            raise ConfigError(f"seed must be an integer in [0, 2**32), found {self.seed}")
        for name in ("epochs", "batch_size", "val_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, found {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, found {self.max_steps}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be >= 1 (or none), found {self.checkpoint_every}")
        if self.max_bad_steps < 1 or self.max_rollbacks < 0 or not 0 < self.rollback_lr_factor < 1:
            raise ConfigError(
                f"need max_bad_steps >= 1, max_rollbacks >= 0 and 0 < rollback_lr_factor < 1; "
                f"found {self.max_bad_steps}, {self.max_rollbacks}, {self.rollback_lr_factor}"
            )
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ConfigError(f"max_minutes must be > 0, found {self.max_minutes}")
        if not 0 < self.lr < math.inf or not 0 < self.eps < math.inf or not self.weight_decay >= 0:
            raise ConfigError(f"need lr > 0, eps > 0, weight_decay >= 0; found {self.lr}, {self.eps}, {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), found {self.betas}")
        if (self.grad_clip is not None and not self.grad_clip > 0) or self.warmup_steps < 0:
            raise ConfigError(
                f"need grad_clip > 0 (or none) and warmup_steps >= 0; found {self.grad_clip}, {self.warmup_steps}"
            )
        if self.lr_schedule not in ("constant", "exponential", "cosine") or not 0 < self.lr_decay <= 1:
            raise ConfigError(f"need lr_schedule constant, exponential or cosine and 0 < lr_decay <= 1; "
                              f"found {self.lr_schedule!r} and {self.lr_decay}")
        if self.schedule_steps is not None and self.schedule_steps < 1:
            raise ConfigError(f"schedule_steps must be >= 1 (or none), found {self.schedule_steps}")


@dataclass
class PixelTrainConfig(TrainConfig):
    """What maximum likelihood on dequantized pixels adds (`couplings.training.pixel`): a target
    to stop at, evaluation and sample sizes, Real NVP's weight-norm L2, and the fast paths
    (their results equal the plain path within tolerance; see tests/test_fast_paths.py)."""

    target_bpd: float | None = None  # stop once validation bits/dim is at or below this (time-to-target runs)
    eval_batch_size: int = 1000
    samples_per_epoch: int = 64
    wn_l2: float = 0.0
    compile: bool = False  # torch.compile the model's negative log-likelihood
    # "bf16": autocast matmuls and convolutions (log-dets and the loss stay float32); "auto": bf16
    # if a short timed probe finds it faster for this model on this machine, else fp32
    # (`couplings.training.pixel.probe_precision`; the choice and timings go into config.json).
    precision: str = "fp32"
    channels_last: bool = False  # channels-last memory format for the convolutions
    adam: str = "auto"  # "fused" where PyTorch has it for the device (else "default"), "foreach", "fused", "default"
    ema_decay: float | None = None  # Polyak (EMA) weights for validation, best.pt, eval and sampling, e.g. 0.999
    # Class-conditional models: w D times the cross-entropy of the model's own classifier p(c | x)
    # (Bayes' rule over log p(x | c)) joins the training loss, never bits/dim; computed on the
    # first discriminative_images images of each batch (one pass per class each).
    discriminative_weight: float = 0.0
    discriminative_images: int = 8
    # Start from the weights of a checkpoint or run directory of the same model and options, or of
    # "pretrained:NAME" (its Polyak averages if it kept them), with a fresh optimizer and schedule.
    init_from: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in (0, 1) (or none), found {self.ema_decay}")
        for name in ("eval_batch_size", "samples_per_epoch", "discriminative_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, found {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be fp32, bf16 or auto, found {self.precision!r}")
        if self.adam not in ("auto", "default", "foreach", "fused"):
            raise ConfigError(f"adam must be auto, default, foreach or fused, found {self.adam!r}")
        if self.target_bpd is not None and not 0 < self.target_bpd < math.inf:
            raise ConfigError(f"target_bpd must be a number of bits/dim > 0 (or none), found {self.target_bpd}")
        if self.wn_l2 < 0 or self.discriminative_weight < 0:
            raise ConfigError(f"need wn_l2 >= 0 and discriminative_weight >= 0, found {self.wn_l2}, {self.discriminative_weight}")
        if self.init_from is not None and not self.init_from.strip():
            raise ConfigError("init_from must name a checkpoint, a run directory or pretrained:NAME (or none)")


@dataclass
class RealNVPTrainConfig(PixelTrainConfig):
    """Real NVP's recipe: Adam 1e-3, batch 64, L2 5e-5 on the weight-norm scales only,
    gradient norms clipped at 100."""

    epochs: int = 100
    batch_size: int = 64
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = 100.0
    wn_l2: float = 5e-5


@dataclass
class GlowTrainConfig(PixelTrainConfig):
    """Glow's recipe: Adam 1e-3 with a linear learning-rate warm-up, batch 64, clipping at 50."""

    epochs: int = 100
    batch_size: int = 64
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = 50.0
    warmup_steps: int = 2000


@dataclass
class LatentTrainConfig(TrainConfig):
    """Two-stage training of `LatentRealNVP`, as the seed project ran it.

    Stage 1 trains the autoencoder for ``ae_epochs`` (Adam ``ae_lr``, weight decay 1e-5;
    ``ae_lr_schedule`` "constant", or "cosine" from ``ae_lr`` to 0 over the stage);
    stage 2 trains the flow on the frozen embeddings for ``epochs`` (Adam ``lr``, with the
    warm-up and ``lr_schedule`` counted from the stage's first step).
    """

    epochs: int = 25
    batch_size: int = 100
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-5
    ae_epochs: int = 10
    ae_lr: float = 1e-3
    ae_lr_schedule: str = "constant"

    def __post_init__(self):
        super().__post_init__()
        if self.ae_epochs < 1 or not self.ae_lr > 0:
            raise ConfigError(f"need ae_epochs >= 1 and ae_lr > 0, found {self.ae_epochs} and {self.ae_lr}")
        if self.ae_lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"ae_lr_schedule must be constant or cosine, found {self.ae_lr_schedule!r}")


def _parse_typed(text: str, kind: Any, key: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if text.lower() == "none" and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _parse_typed(text, inner, key)
    if origin is tuple:
        parts = [p for p in text.split(",") if p.strip()]
        if len(parts) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} comma-separated values, found {text!r}")
        return tuple(_parse_typed(p.strip(), a, key) for p, a in zip(parts, args))
    if kind is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key}: expected true or false, found {text!r}")
    if kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            raise ConfigError(f"{key}: expected {'an integer' if kind is int else 'a number'}, found {text!r}") from None
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, found {text!r}")
        return value
    if kind is str:
        return text
    raise ConfigError(f"{key}: cannot parse values of type {kind}")


def parse_value(cls: type, key: str, text: str) -> Any:
    """Parses ``text`` as the type of field ``key`` of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    if key not in hints:
        raise ConfigError(f"unknown key {key!r}")
    return _parse_typed(text, hints[key], key)


def split_overrides(pairs: list[str], model_config: type, train_config: type = PixelTrainConfig,
                    owner: str | None = None) -> tuple[str | None, dict, dict]:
    """Sorts ``key=value`` strings into (size preset, model fields, training fields).

    Raises:
        ConfigError: A pair has no '=', or names a key that is neither a model option, a
            training option of ``train_config``, nor ``size`` (the message names the model ``owner``).
    """
    model_keys = {f.name for f in fields(model_config)}
    train_keys = {f.name for f in fields(train_config)}
    size, model, train = None, {}, {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"expected key=value, found {pair!r}")
        if not text.strip():
            raise ConfigError(f"{key}: expected a value after '=', found nothing in {pair!r}")
        if key == "size":
            size = text.strip()
        elif key in model_keys:
            model[key] = parse_value(model_config, key, text.strip())
        elif key in train_keys:
            train[key] = parse_value(train_config, key, text.strip())
        else:
            known = ", ".join(sorted(model_keys | train_keys | {"size"}))
            of = f" of {owner}" if owner else ""
            raise ConfigError(f"unknown key {key!r} in --set {pair}: not an option{of}; known keys: {known}")
    return size, model, train


def from_stored(cls: type, stored: dict) -> Any:
    """Rebuilds dataclass ``cls`` from a dict stored in a checkpoint or config.json: lists back to
    tuples, and fields that an older couplings stored but ``cls`` no longer has are dropped
    (before the pixel and latent options were separated, every run stored all of them)."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items() if k in known})


def apply_overrides(config: Any, overrides: dict) -> Any:
    """A copy of dataclass ``config`` with ``overrides`` applied and validated."""
    try:
        return dataclasses.replace(config, **overrides)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def format_value(value: Any) -> str:
    """A value as ``--set key=VALUE`` writes it (the inverse of `parse_value`)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return ",".join(format_value(v) for v in value)
    return str(value)


def option_lines(config: Any, default: Any, preset: dict, given: dict, preset_name: str) -> list[str]:
    """One ``--set key=value`` line per field of dataclass ``config``, aligned, each with a
    comment: the default, and whether the value comes from the preset or was given."""
    pairs = [(f"--set {f.name}={format_value(getattr(config, f.name))}", f.name) for f in fields(config)]
    width = max(len(line) for line, _ in pairs)
    lines = []
    for line, key in pairs:
        origin = "given" if key in given else f"size={preset_name}" if key in preset else ""
        note = f"default {format_value(getattr(default, key))}" + (f"; {origin}" if origin else "")
        lines.append(f"{line.ljust(width)}  # {note}")
    return lines
