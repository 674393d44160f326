"""Dequantization: turning 8-bit pixels k into continuous images x = (k + u) / 256, with the noise u
drawn uniformly or from a learned conditional flow q(u | k)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from couplings.transforms import Composite, Inverse, Logit, affine_coupling2d

__all__ = ["VariationalDequantizer"]


class VariationalDequantizer(nn.Module):
    """q(u | k): dequantization noise u in (0, 1)^D from a flow conditioned on the image.

    Uniform base noise eps -> logit -> ``couplings`` affine couplings (alternating checkerboard
    masks, bounded scales, gated networks that also see the image rescaled to [-1, 1]) -> sigmoid
    -> u. ``forward(noise, pixels)`` returns u and ``log q(u | k)`` (B,), every log-det counted,
    so that ``log p(x) - log q(u | k)`` at ``x = (k + u) / 256`` bounds the log-probability of
    the pixels from below (the variational bound of Flow++; uniform noise is q = 1).

    References:
        Ho, Chen, Srinivas, Duan and Abbeel, "Flow++", 2019, section 3.1.
    """

    def __init__(self, channels: int, *, couplings: int = 4, hidden: int = 16, blocks: int = 2):
        super().__init__()
        steps = [affine_coupling2d(channels, "checkerboard", i % 2, hidden, blocks, scale="bounded", net="gated",
                                  context_channels=channels) for i in range(couplings)]
        self.flow = Composite([Logit(0.0), *steps, Inverse(Logit(0.0))])

    def forward(self, noise: Tensor, pixels: Tensor) -> tuple[Tensor, Tensor]:
        tiny = torch.finfo(noise.dtype).eps  # keeps the logit of the base noise finite
        context = pixels.to(noise.dtype) / 127.5 - 1  # (B, C, H, W) in [-1, 1]
        u, logabsdet = self.flow(noise.clamp(tiny, 1 - tiny), context)
        return u, -logabsdet  # the base density is 1 on (0, 1)^D
