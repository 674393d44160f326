"""Priors of the halves a multi-scale flow factors out (Glow's learned split priors)."""

from __future__ import annotations

from torch import Tensor, nn

from couplings.transforms.base import Transform

__all__ = ["LearnedSplitPrior"]


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

