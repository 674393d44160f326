"""The seed project's Real NVP: a conv autoencoder and a class-conditional flow on its embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from couplings.distributions import StandardNormal
from couplings.models.base import Flow, check_at_least, with_options
from couplings.transforms import AffineCoupling, BatchNormFlow, ClassConditionalPrior, Composite, Context, Permutation

__all__ = ["ConvAutoencoder", "LatentRealNVP", "LatentRealNVPConfig"]


@dataclass
class LatentRealNVPConfig:
    """The options of `LatentRealNVP`; the defaults are the seed project's."""

    embedding_dim: int = 20
    couplings: int = 9
    hidden_layers: int = 2
    hidden_units: int = 100
    conditional: bool = True
    num_classes: int = 10
    image_size: int = 28
    class_prior: bool = False  # a learned Gaussian per class (Glow's class-conditional prior) at the flow's end
    ae_channels: int = 32  # the autoencoder's first convolution; the second has twice as many
    ae_conv_bias: bool = True  # False: the encoder's convolutions have no bias, as in the seed project's demo

    def __post_init__(self):
        check_at_least(self, 1, "couplings", "hidden_layers", "hidden_units", "num_classes", "ae_channels")
        if self.embedding_dim < 2:
            raise ValueError(f"embedding_dim must be >= 2 (a coupling splits it in two), found {self.embedding_dim}")
        if self.class_prior and not self.conditional:
            raise ValueError("class_prior needs a class-conditional model (conditional=true)")
        if self.image_size < 4 or self.image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 (two stride-2 convs), found {self.image_size}")


class ConvAutoencoder(nn.Module):
    """1 -> C (3x3, stride 2) -> 2C (3x3, stride 2) -> linear embedding, C = ``channels`` (the
    seed project's 32); the decoder mirrors it with transposed convolutions and ends in logits
    (``decode`` applies the sigmoid). ``conv_bias=False`` drops the encoder convolutions' biases."""

    def __init__(self, embedding_dim: int = 20, image_size: int = 28, channels: int = 32, conv_bias: bool = True):
        super().__init__()
        side, c = image_size // 4, channels
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c, 3, stride=2, padding=1, bias=conv_bias), nn.ReLU(),  # (B, 1, S, S) -> (B, C, S/2, S/2)
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=conv_bias), nn.ReLU(),  # -> (B, 2C, S/4, S/4)
            nn.Flatten(), nn.Linear(2 * c * side * side, embedding_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(embedding_dim, 2 * c * side * side), nn.ReLU(),
            nn.Unflatten(1, (2 * c, side, side)),
            nn.ConvTranspose2d(2 * c, c, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),  # -> (B, C, S/2, S/2)
            nn.ConvTranspose2d(c, 1, 3, stride=2, padding=1, output_padding=1),  # -> (B, 1, S, S)
        )

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def decode_logits(self, e: Tensor) -> Tensor:
        return self.decoder(e)

    def decode(self, e: Tensor) -> Tensor:
        return torch.sigmoid(self.decoder(e))

    def loss(self, x: Tensor) -> Tensor:
        """Binary cross-entropy of the reconstruction, summed over pixels, mean over the batch."""
        logits = self.decode_logits(self.encode(x))
        return F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]


class LatentRealNVP(Flow):
    """A conv autoencoder to a 20-d embedding and a Real NVP on the embeddings, conditioned on
    the one-hot digit label: per step an affine coupling (odd/even masks alternating, tanh-bounded
    scale), a batch-norm layer with its log-det, and a fixed random permutation; with
    ``class_prior``, the latent of each class is also a learned Gaussian (Glow's class prior).

    ``log_prob`` is the density of the image's *embedding* in R^embedding_dim, not a density on
    pixels: this model has no pixel bits/dim (``has_pixel_density`` is False, and
    `couplings.likelihood.bits_per_dim` refuses it). ``transform`` maps images to the flow's
    latents of their embeddings, ``inverse`` decodes latents to images in [0, 1]; both log-dets
    are the flow's alone (the autoencoder is not invertible). Built from a
    `LatentRealNVPConfig` and/or its fields as keywords.

    Examples:
        A small class-conditional model: the density is of each image's 20-d embedding given its
        label, and sampling without labels cycles through the digits.

        >>> import torch
        >>> from couplings import LatentRealNVP
        >>> model = LatentRealNVP(couplings=2, hidden_units=16)
        >>> model.has_pixel_density
        False
        >>> x, y = torch.rand(3, 1, 28, 28), torch.tensor([7, 0, 3])
        >>> model.log_prob(x, y).shape
        torch.Size([3])
        >>> model.sample(4).shape
        torch.Size([4, 1, 28, 28])
    """

    has_pixel_density = False

    def __init__(self, config: LatentRealNVPConfig | None = None, /, **options):
        super().__init__()
        self.config = config = with_options(config or LatentRealNVPConfig(), options)
        self.conditional, self.num_classes = config.conditional, config.num_classes
        dim = config.embedding_dim
        self.event_shape = (1, config.image_size, config.image_size)
        self.autoencoder = ConvAutoencoder(dim, config.image_size, config.ae_channels, config.ae_conv_bias)
        context = config.num_classes if config.conditional else 0
        layers = []
        for i in range(config.couplings):
            mask = torch.arange(dim) % 2 == i % 2
            layers += [
                AffineCoupling(mask, config.hidden_layers, config.hidden_units, Context(context) if context else None),
                BatchNormFlow(dim),
                Permutation(dim, seed=i),
            ]
        self.flow = Composite(layers)
        self.class_prior = ClassConditionalPrior(dim, config.num_classes) if config.class_prior else None
        self.prior = StandardNormal(dim)

    def context(self, y: Tensor | None, n: int) -> Tensor | None:
        """Labels (n,) -> one-hot (n, num_classes) for a conditional model; None otherwise."""
        if not self.conditional:
            return None
        if y is None:
            raise ValueError("this LatentRealNVP is class-conditional: pass labels y of shape (B,)")
        y = torch.as_tensor(y, device=self.prior.device).long()
        if y.shape != (n,) or y.min() < 0 or y.max() >= self.config.num_classes:
            raise ValueError(f"expected labels of shape ({n},) in 0..{self.config.num_classes - 1}, found {y.tolist()}")
        return F.one_hot(y, self.config.num_classes).to(self.prior.dtype)

    def _flow(self, e: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        """Embeddings -> latents under the standard normal, with the log-det (the class prior last)."""
        z, logabsdet = self.flow(e, self.context(y, len(e)))
        if self.class_prior is not None:
            z, ld = self.class_prior(z, torch.as_tensor(y, device=z.device))
            logabsdet = logabsdet + ld
        return z, logabsdet

    def embedding_log_prob(self, e: Tensor, y: Tensor | None = None) -> Tensor:
        """Log-density (nats) of embeddings e (B, embedding_dim)."""
        z, logabsdet = self._flow(e, y)
        return self.prior.log_prob(z).sum(-1) + logabsdet

    def transform(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Images -> flow latents of their embeddings (B, embedding_dim) and the flow's log-det."""
        return self._flow(self.autoencoder.encode(x), y)

    def inverse(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        context = self.context(y, len(z))  # checks the labels
        logabsdet = z.new_zeros(len(z))
        if self.class_prior is not None:
            z, logabsdet = self.class_prior.inverse(z, torch.as_tensor(y, device=z.device))
        e, ld = self.flow.inverse(z, context)
        return self.autoencoder.decode(e), logabsdet + ld

    @torch.inference_mode()
    def sample_with_log_prob(
        self, n: int, y: Tensor | None = None, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Images (n, 1, S, S) and the log-density of each one's embedding; a conditional model
        without ``y`` cycles through the labels 0, 1, ..., 9, 0, ..."""
        if self.conditional and y is None:
            y = torch.arange(n) % self.num_classes
        return super().sample_with_log_prob(n, y, temperature, generator)

    def sample(
        self, n: int, y: Tensor | None = None, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> Tensor:
        """Draws n images; a conditional model without ``y`` cycles through the labels 0, 1, ..., 9, 0, ..."""
        return self.sample_with_log_prob(n, y, temperature, generator)[0]
