"""Glow: ActNorm, invertible 1x1 convolutions and affine couplings in a multi-scale flow."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from couplings.models.base import at_least_float32, check_at_least, check_one_of, with_options
from couplings.models.dequantization import VariationalDequantizer
from couplings.models.multiscale import MultiScaleFlow, check_image_shape
from couplings.transforms import (
    ActNorm,
    ClassConditionalPrior,
    Composite,
    InvConv1x1,
    LearnedSplitPrior,
    Logit,
    Shift,
    Squeeze,
    Transform,
    affine_coupling2d,
    mixture_coupling2d,
)

__all__ = ["GLOW_PRESETS", "Glow", "GlowConfig"]


@dataclass
class GlowConfig:
    """The options of `Glow`; the defaults are the `mnist` size."""

    image_shape: tuple[int, int, int] = (1, 28, 28)
    levels: int = 2
    steps: int = 16
    hidden: int = 128
    blocks: int = 1
    min_scale: float = 0.3
    num_classes: int = 0  # > 0: class-conditional, a learned prior of the top latent per class
    class_prior: str = "channel"  # "channel" (the paper: a mean and scale per channel) or "position" (per pixel too)
    class_couplings: bool = False  # with num_classes: every coupling network also sees the label (one-hot maps)
    class_loss_weight: float = 0.0  # with num_classes (not class_couplings): the paper's classifier of the top latent
    net: str = "resnet"  # the couplings' networks: "resnet" or "gated" (Flow++)
    scale: str = "sigmoid"  # "sigmoid" (the paper, bounded below by min_scale) or "bounded": c * tanh(h / c)
    dequantization: str = "uniform"  # or "variational": a learned q(u | k) (Flow++)
    dequant_hidden: int = 16  # channels of the variational dequantizer's gated networks
    alpha: float | None = None  # None: pixels centred at 0 (the paper); a number: logit with this alpha, as Real NVP
    coupling: str = "affine"  # or "mixture": Flow++'s logistic-mixture CDF coupling (scale, min_scale unused)
    mixtures: int = 8  # with coupling="mixture": the logistics per mixture (K)

    def __post_init__(self):
        self.image_shape = tuple(self.image_shape)
        if self.levels < 1 or self.steps < 1 or self.hidden < 1 or self.blocks < 0:
            raise ValueError(f"need levels, steps, hidden >= 1 and blocks >= 0; found {self}")
        if not 0 <= self.min_scale < 1:
            raise ValueError(f"min_scale must be in [0, 1), found {self.min_scale}")
        if self.alpha is not None and not 0 <= self.alpha < 0.5:
            raise ValueError(f"alpha must be in [0, 0.5) (or none), found {self.alpha}")
        if self.num_classes < 0 or self.dequant_hidden < 1:
            raise ValueError(f"need num_classes >= 0 and dequant_hidden >= 1; found {self.num_classes}, {self.dequant_hidden}")
        if self.class_couplings and not self.num_classes:
            raise ValueError("class_couplings=true needs a class-conditional model: set num_classes too")
        if self.class_loss_weight < 0 or (self.class_loss_weight and not self.num_classes):
            raise ValueError(f"class_loss_weight must be >= 0, and > 0 only with num_classes; found "
                             f"{self.class_loss_weight} with num_classes={self.num_classes}")
        if self.class_loss_weight and self.class_couplings:  # measured: docs/results.md
            raise ValueError("class_loss_weight needs class_couplings=false: couplings that see the label can write "
                             "it into the top latent, and the classifier then reads the label, not the image")
        check_one_of(self, net=("resnet", "gated"), scale=("sigmoid", "bounded"), dequantization=("uniform", "variational"),
                     class_prior=("channel", "position"), coupling=("affine", "mixture"))
        check_at_least(self, 1, "mixtures")
        check_image_shape(self.image_shape, self.levels, "levels")


# "fast": measured with benchmarks/learning_curve.py (results/curves/xeon/glow-fast-25min.jsonl):
# 1.200 validation bits/dim after 25 minutes on one CPU thread; warm-up, clipping and precision
# (auto: bf16 where a short probe finds it faster) are training options.
GLOW_PRESETS = {
    "mnist": {},
    "small": {"steps": 6, "hidden": 64, "blocks": 0},
    "fast": {"steps": 6, "hidden": 32, "blocks": 1, "alpha": 1e-5, "net": "gated", "scale": "bounded",
             "dequantization": "variational", "warmup_steps": 0, "grad_clip": 500.0,
             "precision": "auto"},
}


class Glow(MultiScaleFlow):
    """Glow: pixels centred at 0, then per level a squeeze and ``steps`` steps of flow
    (ActNorm -> invertible 1x1 convolution in LU form -> affine coupling with
    ``scale = sigmoid(h + 2)``), and half of the channels factored out under a learned
    conditional prior (all levels but the last).

    One deliberate change from the paper: the coupling scale is bounded below,
    ``min_scale + (1 - min_scale) * sigmoid(h + 2)`` with ``min_scale = 0.3``, because with the
    paper's form a trained model contracted pixels by 1e-5 and lost them to float32 rounding
    (reconstruction error 0.04 after 5 epochs; see `AffineCoupling2d`); with 0.1 the error was
    still 3e-4 after an hour, with 0.3 it is 2e-5. ``min_scale=0`` is the paper's form.
    Built from a `GlowConfig` and/or its fields as keywords. With ``num_classes > 0`` it is
    class-conditional: the top latent has a learned prior per class (`ClassConditionalPrior`),
    and ``transform``, ``inverse`` and ``sample`` take labels. ``net``, ``scale``,
    ``dequantization`` and ``coupling="mixture"`` offer the same fast-learning options as `RealNVP`.

    Examples:
        A two-step, class-conditional Glow on 3x8x8 images (the sides must halve ``levels`` times):

        >>> import torch
        >>> from couplings import Glow
        >>> model = Glow(image_shape=(3, 8, 8), levels=2, steps=2, hidden=8, blocks=0, num_classes=10)
        >>> x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> model.log_prob(x, y).shape
        torch.Size([4])
        >>> model.sample(4, y).shape
        torch.Size([4, 3, 8, 8])

    References:
        Kingma and Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def __init__(self, config: GlowConfig | None = None, /, **options):
        config = with_options(config or GlowConfig(), options)
        c, h, w = config.image_shape
        hidden, blocks, min_scale = config.hidden, config.blocks, config.min_scale

        def step_of_flow(channels: int, seed: int) -> list[Transform]:
            bound = min_scale if config.scale == "sigmoid" else 0.0
            labels = config.num_classes if config.class_couplings else 0
            if config.coupling == "mixture":
                coupling = mixture_coupling2d(channels, "channel", 0, hidden, blocks, config.mixtures, net=config.net,
                                             num_classes=labels)
            else:
                coupling = affine_coupling2d(channels, "channel", 0, hidden, blocks, scale=config.scale, min_scale=bound,
                                            net=config.net, num_classes=labels)
            return [ActNorm(channels), InvConv1x1(channels, seed=seed), coupling]

        blocks_per_level, out_shapes, priors = [], [], []
        for level in range(config.levels):
            c, h, w = 4 * c, h // 2, w // 2  # after the squeeze
            layers = [Squeeze()]
            for k in range(config.steps):
                layers += step_of_flow(c, seed=1000 * level + k)
            blocks_per_level.append(Composite(layers))
            if level < config.levels - 1:
                out_shapes.append((c // 2, h, w))
                priors.append(LearnedSplitPrior(c // 2, c // 2))
                c //= 2
        out_shapes.append((c, h, w))
        final = blocks_per_level.pop()
        if config.num_classes:
            per_position = (h, w) if config.class_prior == "position" else None
            final = Composite([*final.transforms, ClassConditionalPrior(c, config.num_classes, per_position)])
        preprocess = Shift(-0.5) if config.alpha is None else Logit(config.alpha)
        super().__init__(config.image_shape, preprocess, blocks_per_level, final, out_shapes, priors)
        self.config = config
        self.conditional, self.num_classes = config.num_classes > 0, config.num_classes
        if config.dequantization == "variational":
            self.dequantizer = VariationalDequantizer(config.image_shape[0], hidden=config.dequant_hidden)
        if config.class_loss_weight:  # the paper's linear classifier of the top latent's channel means, from zero
            self.classifier = nn.Linear(c, config.num_classes)
            nn.init.zeros_(self.classifier.weight)
            nn.init.zeros_(self.classifier.bias)

    def class_loss(self, z: Tensor, y: Tensor) -> Tensor | None:
        """With ``class_loss_weight`` w: ``w D`` times the cross-entropy (nats) of the labels ``y``
        under the classifier of the top latent's channel means (the top latent before its class
        prior, recovered from ``z`` and ``y``), so that w weighs bits of classification against
        bits per dimension (openai/glow's ``weight_y``). It pushes the flow to carry the label in
        the top latent; bits/dim never include it."""
        if not self.config.class_loss_weight:
            return None
        top_shape = self.out_shapes[-1]
        top = z[:, -math.prod(top_shape):].reshape(len(z), *top_shape)
        h, _ = self.final.transforms[-1].inverse(top, y)  # undo the class prior's standardising map
        logits = self.classifier(h.mean(dim=(2, 3)))
        return self.config.class_loss_weight * self.dim * F.cross_entropy(at_least_float32(logits), y.long())
