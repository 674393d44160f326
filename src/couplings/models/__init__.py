"""Flow models, and the registry the training loop and CLI build them from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from couplings.config import GlowTrainConfig, LatentTrainConfig, RealNVPTrainConfig, TrainConfig
from couplings.models.base import Flow
from couplings.models.glow import GLOW_PRESETS, Glow, GlowConfig
from couplings.models.latent_realnvp import ConvAutoencoder, LatentRealNVP, LatentRealNVPConfig
from couplings.models.multiscale import MultiScaleFlow
from couplings.models.nice import NICE, NICE_PRESETS, NICEConfig
from couplings.models.realnvp import REALNVP_PRESETS, RealNVP, RealNVPConfig

__all__ = [
    "MODELS",
    "NICE",
    "ConvAutoencoder",
    "Flow",
    "Glow",
    "GlowConfig",
    "MultiScaleFlow",
    "RealNVP",
    "RealNVPConfig",
    "LatentRealNVP",
    "LatentRealNVPConfig",
    "ModelEntry",
    "NICEConfig",
]


@dataclass(frozen=True)
class ModelEntry:
    """How to build one model by name.

    Attributes:
        cls: The model class; its constructor takes the config's fields as keywords.
        config: The config dataclass (validated, stored in every checkpoint).
        presets: Named sizes ("paper", "small", ...) as config overrides.
        published: (test bits/dim on MNIST, source) of the paper's figure, if any.
        train_config: The training options dataclass, with this model's recipe as defaults.
    """

    cls: type
    config: type
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    published: tuple[float, str] | None = None
    train_config: type = TrainConfig


MODELS: dict[str, ModelEntry] = {
    "nice": ModelEntry(NICE, NICEConfig, NICE_PRESETS, (4.36, "NICE paper: 1980.50 nats")),
    "latent-realnvp": ModelEntry(
        LatentRealNVP,
        LatentRealNVPConfig,
        {"paper": {}, "small": {"couplings": 4, "hidden_units": 64}},
        train_config=LatentTrainConfig,
    ),
    "realnvp": ModelEntry(RealNVP, RealNVPConfig, REALNVP_PRESETS, (1.06, "FFJORD paper table"), RealNVPTrainConfig),
    "glow": ModelEntry(Glow, GlowConfig, GLOW_PRESETS, (1.05, "FFJORD paper table"), GlowTrainConfig),
}
