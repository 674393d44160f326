"""Learned priors inside a multi-scale flow: Glow's split priors for the factored-out halves, and
its class-conditional prior of the top latent."""

from __future__ import annotations

from torch import Tensor, nn

from couplings.transforms.base import Transform, check_labels

__all__ = ["ClassConditionalPrior", "LearnedSplitPrior"]


class LearnedSplitPrior(Transform):
    """Glow's learned prior for a factored-out half: ``z_out ~ N(mu(h), sigma(h)^2)`` given the
    kept half ``h``, from a zero-initialised 3x3 convolution.

    It is applied as the standardising map ``eps = (z_out - mu) / sigma`` with log-det
    ``-sum(log sigma)``, so the model's prior stays a standard normal and
    ``log_prob == prior.log_prob(z).sum(-1) + logabsdet`` holds exactly. As a `Transform` it
    maps ``z_out`` with the kept half ``h`` as its context ``y``.
    """

    def __init__(self, kept_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(kept_channels, 2 * out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        mu, log_sigma = self.conv(y).chunk(2, dim=1)
        return (x - mu) * (-log_sigma).exp(), -log_sigma.flatten(1).sum(1)

    def inverse(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        mu, log_sigma = self.conv(y).chunk(2, dim=1)
        return z * log_sigma.exp() + mu, log_sigma.flatten(1).sum(1)


class ClassConditionalPrior(Transform):
    """Glow's class-conditional prior of the top latent: ``h ~ N(mu(y), sigma(y)^2)`` per channel
    of an image (B, C, H, W), or per entry of a flat vector (B, C), from a zero-initialised
    embedding of the label ``y`` (B,), so training starts from the standard normal.

    Applied, like `LearnedSplitPrior`, as the standardising map ``(h - mu) / sigma`` with log-det
    ``-H W sum(log sigma)``, so the model's prior stays a standard normal and sampling a class
    is sampling the prior and inverting with its label. With ``shape = (H, W)`` the mean and
    scale are learned per channel *and position* of an (B, C, H, W) input: a template per class
    rather than one number per channel.

    References:
        Kingma and Dhariwal, Glow, 2018, section 5 (class-conditional priors).
    """

    def __init__(self, channels: int, num_classes: int, shape: tuple[int, int] | None = None):
        super().__init__()
        self.num_classes, self.shape = num_classes, tuple(shape) if shape else None
        positions = self.shape[0] * self.shape[1] if self.shape else 1
        self.embedding = nn.Embedding(num_classes, 2 * channels * positions)
        nn.init.zeros_(self.embedding.weight)

    def _stats(self, y: Tensor | None, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        check_labels(y, x.shape[0], self.num_classes)
        stats = self.embedding(y.long()).to(x.dtype)  # (B, 2C), or (B, 2C H W) per position
        if self.shape:
            if x.dim() != 4 or x.shape[2:] != self.shape:
                raise ValueError(f"this prior has a mean per position of {self.shape}; found input {tuple(x.shape)}")
            stats = stats.view(len(x), -1, *self.shape)  # (B, 2C, H, W)
        elif x.dim() == 4:
            stats = stats[:, :, None, None]  # (B, 2C, 1, 1): the same for every pixel
        mu, log_sigma = stats.chunk(2, dim=1)
        pixels = x.shape[2] * x.shape[3] if x.dim() == 4 and not self.shape else 1
        return mu, log_sigma, pixels * log_sigma.flatten(1).sum(1)

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        mu, log_sigma, ld = self._stats(y, x)
        return (x - mu) * (-log_sigma).exp(), -ld

    def inverse(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        mu, log_sigma, ld = self._stats(y, z)
        return z * log_sigma.exp() + mu, ld
