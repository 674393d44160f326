"""Element-wise layers: the logit preprocessing of [0, 1] pixels and a constant shift."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from couplings.transforms.base import Transform, per_sample_sum

__all__ = ["Logit", "Shift"]


class Logit(Transform):
    """``y = logit(alpha + (1 - 2 alpha) x)`` for x in [0, 1]; its log-det is part of the model.

    References:
        Dinh et al., Real NVP, 2017, section 4.1.
    """

    def __init__(self, alpha: float = 0.05):
        super().__init__()
        if not 0 <= alpha < 0.5:
            raise ValueError(f"alpha must be in [0, 0.5), found {alpha}")
        self.alpha = alpha

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        p = self.alpha + (1 - 2 * self.alpha) * x
        log_p, log_1mp = torch.log(p), torch.log1p(-p)
        z = log_p - log_1mp
        # dz/dx = (1 - 2 alpha) / (p (1 - p))
        logabsdet = per_sample_sum(math.log(1 - 2 * self.alpha) - log_p - log_1mp)
        return z, logabsdet

    def inverse(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        p = torch.sigmoid(z)
        x = (p - self.alpha) / (1 - 2 * self.alpha)
        logabsdet = per_sample_sum(F.logsigmoid(z) + F.logsigmoid(-z) - math.log(1 - 2 * self.alpha))
        return x, logabsdet


class Shift(Transform):
    """``z = x + offset`` (volume-preserving), e.g. Glow's centring of [0, 1] pixels at 0."""

    def __init__(self, offset: float):
        super().__init__()
        self.offset = offset

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x + self.offset, x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z - self.offset, z.new_zeros(z.shape[0])

