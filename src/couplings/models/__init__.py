"""Flow models, and the one registry that names them: class, config, sizes, training recipe,
trainer and published figure.

Imports nothing from training, data, the CLI or the report (trainers are named, not imported).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from couplings.config import GlowTrainConfig, LatentTrainConfig, PixelTrainConfig, RealNVPTrainConfig, TrainConfig
from couplings.models.base import Flow
from couplings.models.glow import GLOW_PRESETS, Glow, GlowConfig
from couplings.models.latent_realnvp import ConvAutoencoder, LatentRealNVP, LatentRealNVPConfig
from couplings.models.multiscale import MultiScaleFlow
from couplings.models.nice import NICE, NICE_PRESETS, NICEConfig
from couplings.models.realnvp import REALNVP_PRESETS, RealNVP, RealNVPConfig

__all__ = [
    "MODELS",
    "NICE",
    "PUBLISHED",
    "ConvAutoencoder",
    "Flow",
    "Glow",
    "GlowConfig",
    "LatentRealNVP",
    "LatentRealNVPConfig",
    "ModelEntry",
    "MultiScaleFlow",
    "NICEConfig",
    "Published",
    "RealNVP",
    "RealNVPConfig",
    "build_model",
]


@dataclass(frozen=True)
class Published:
    """A published MNIST test figure (dequantized, D = 784), in the unit its source gives it."""

    name: str
    unit: str  # "nats" or "bits/dim"
    value: float
    source: str

    def bits_per_dim(self, dim: int = 784) -> float:
        """The figure in bits/dim: ``8 - log p / (D ln 2)`` for a log-likelihood in nats."""
        return 8.0 - self.value / (dim * math.log(2)) if self.unit == "nats" else self.value

    def nats(self, dim: int = 784) -> float:
        """The figure as a log-likelihood in nats."""
        return self.value if self.unit == "nats" else (8.0 - self.value) * dim * math.log(2)


PUBLISHED = [
    Published("NICE", "nats", 1980.50, "NICE paper table (Dinh et al., 2014)"),
    Published("MAF (5)", "bits/dim", 1.89, "FFJORD paper table"),
    Published("Real NVP (multi-scale)", "bits/dim", 1.06, "FFJORD paper table"),
    Published("Glow", "bits/dim", 1.05, "FFJORD paper table"),
    Published("FFJORD (multi-scale)", "bits/dim", 0.99, "FFJORD paper"),
    Published("Residual Flows", "bits/dim", 0.97, "Residual Flows paper"),
]
_BY_NAME = {p.name: p for p in PUBLISHED}


def _image_shape_options(image_shape: tuple[int, int, int]) -> dict[str, Any]:
    """Real NVP and Glow take images of any shape whose sides their squeezes can halve."""
    return {"image_shape": tuple(image_shape)}


def _nice_shape_options(image_shape: tuple[int, int, int]) -> dict[str, Any]:
    """NICE flattens its images: ``dim`` pixels, given back in ``image_shape``."""
    return {"dim": math.prod(image_shape), "image_shape": tuple(image_shape)}


def _latent_shape_options(image_shape: tuple[int, int, int]) -> dict[str, Any]:
    """The latent model's autoencoder takes square grayscale images."""
    c, h, w = image_shape
    if c != 1 or h != w:
        raise ValueError(f"its autoencoder takes square grayscale images (1xSxS, S a multiple of 4), found {c}x{h}x{w}")
    return {"image_size": h}


@dataclass(frozen=True)
class ModelEntry:
    """Everything that is known about one model by name.

    Attributes:
        cls: The model class; ``cls(config)`` builds it.
        config: Its config dataclass (validated, stored in every checkpoint).
        presets: Named sizes ("paper", "small", "fast", ...) as overrides of the model's config and,
            for a recipe that needs them, of its training options; the first is the default.
        train_config: The training options dataclass, with this model's recipe as defaults;
            an option it does not have is refused, never ignored.
        trainer: The module of `couplings.training` that trains it ("pixel" or "latent").
        published: The paper's MNIST figure, if any.
        shape_options: (C, H, W) of a dataset's images -> the config options that make the model
            take them; raises ValueError for a shape it cannot take.
    """

    cls: type
    config: type
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    train_config: type[TrainConfig] = PixelTrainConfig
    trainer: str = "pixel"
    published: Published | None = None
    shape_options: Callable[[tuple[int, int, int]], dict[str, Any]] = _image_shape_options

    def preset(self, size: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """A preset split into (model config overrides, training option overrides)."""
        model_keys = {f.name for f in fields(self.config)}
        preset = self.presets[size]
        return ({k: v for k, v in preset.items() if k in model_keys},
                {k: v for k, v in preset.items() if k not in model_keys})


# "default": chosen by controlled runs against the origin recipe (benchmarks/latent_ablation.py,
# docs/results.md): a learned Gaussian per class at the flow's end, 256 hidden units, Adam 1e-3,
# the autoencoder twice as wide (ae_channels=64) at Adam 3e-3, in the origin's 10 + 20 epochs. "origin": the seed project's
# recipe as its demo ran it (9 couplings x 100 units, Adam 1e-4, 10 + 20 epochs).
LATENT_REALNVP_PRESETS = {
    "default": {"hidden_units": 256, "class_prior": True, "ae_channels": 64, "lr": 1e-3, "epochs": 20, "ae_lr": 3e-3},
    "origin": {"epochs": 20},
    "small": {"couplings": 4, "hidden_units": 64},
}

MODELS: dict[str, ModelEntry] = {
    "nice": ModelEntry(NICE, NICEConfig, NICE_PRESETS, published=_BY_NAME["NICE"], shape_options=_nice_shape_options),
    "latent-realnvp": ModelEntry(
        LatentRealNVP,
        LatentRealNVPConfig,
        LATENT_REALNVP_PRESETS,
        LatentTrainConfig,
        trainer="latent",
        shape_options=_latent_shape_options,
    ),
    "realnvp": ModelEntry(RealNVP, RealNVPConfig, REALNVP_PRESETS, RealNVPTrainConfig,
                          published=_BY_NAME["Real NVP (multi-scale)"]),
    "glow": ModelEntry(Glow, GlowConfig, GLOW_PRESETS, GlowTrainConfig, published=_BY_NAME["Glow"]),
}


def build_model(name: str, model_config: dict[str, Any]) -> Flow:
    """Builds model ``name`` from its config dict (as stored in a checkpoint)."""
    entry = MODELS[name]
    return entry.cls(entry.config(**model_config))
