"""Normalising layers with a log-determinant: batch norm as a flow (flat or image tensors) and ActNorm."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from couplings.transforms.base import Transform, batch_is_shared, share_mean

__all__ = ["ActNorm", "BatchNormFlow"]


class BatchNormFlow(Transform):
    """Batch normalisation as an invertible layer, with its log-determinant, on flat vectors
    (B, F) or, with ``spatial=True``, per channel on images (B, C, H, W).

    ``z = (x - mean) / sqrt(var + eps) * exp(log_gamma) + beta``. In training mode ``forward``
    uses the batch statistics (biased variance, treated as constants in the log-det, as in Real
    NVP) and moves the running averages ``momentum`` of the way towards them (the running
    variance is the unbiased estimate, as in ``torch.nn.BatchNorm``); in eval mode, and always in
    ``inverse``, the running averages are used, so sample in eval mode. Each feature contributes
    ``log_gamma - log(var + eps) / 2`` to the log-det once per pixel.

    Args:
        features: F for flat inputs, C for images.
        spatial: Images: statistics over (batch, height, width) per channel.
        momentum: Weight of the new batch in the running averages.
        eps: Added to the variance.

    References:
        Dinh, Sohl-Dickstein and Bengio, "Density estimation using Real NVP", 2017, section 3.7.
    """

    def __init__(self, features: int, *, spatial: bool = False, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        if not 0 < momentum <= 1 or not eps > 0:
            raise ValueError(f"need 0 < momentum <= 1 and eps > 0, found {momentum} and {eps}")
        self.momentum, self.eps, self.spatial = momentum, eps, spatial
        shape = (1, features, 1, 1) if spatial else (features,)
        self.log_gamma = nn.Parameter(torch.zeros(shape))
        self.beta = nn.Parameter(torch.zeros(shape))
        self.register_buffer("running_mean", torch.zeros(shape))
        self.register_buffer("running_var", torch.ones(shape))

    def _log_det(self, var: Tensor, x: Tensor) -> Tensor:
        pixels = x[0, 0].numel()  # H * W for images, 1 for flat vectors
        return (pixels * (self.log_gamma - 0.5 * torch.log(var + self.eps)).sum()).expand(x.shape[0])

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.training:
            dims = (0, 2, 3) if self.spatial else (0,)
            mean = x.mean(dim=dims, keepdim=self.spatial)
            var = x.var(dim=dims, keepdim=self.spatial, unbiased=False)
            with torch.no_grad():
                n = x.numel() // x.shape[1]
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / (n - 1) if n > 1 else var, self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        z = (x - mean) * torch.rsqrt(var + self.eps) * self.log_gamma.exp() + self.beta
        return z, self._log_det(var, x)

    def inverse(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        mean, var = self.running_mean, self.running_var
        x = (z - self.beta) * (-self.log_gamma).exp() * torch.sqrt(var + self.eps) + mean
        return x, -self._log_det(var, z)


class ActNorm(Transform):
    """Per-channel ``z = (x + bias) * exp(log_scale)``, initialised from the first batch it sees
    so that the outputs have zero mean and unit variance per channel (under torchrun, of the
    global batch: the statistics are averaged over the ranks' shares). The ``initialized`` flag is
    a buffer, so a loaded model never re-initialises.

    References:
        Kingma and Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        if not batch_is_shared():
            mean = x.mean(dim=(0, 2, 3), keepdim=True)
            std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
        else:  # the statistics of the global batch, from every rank's equal share of it
            mean = share_mean(x.mean(dim=(0, 2, 3), keepdim=True))
            std = share_mean((x - mean).square().mean(dim=(0, 2, 3), keepdim=True)).sqrt()
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + 1e-6))
        self.initialized.fill_(True)

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if not self.initialized:
            self._initialize(x)
        pixels = x.shape[2] * x.shape[3]
        return (x + self.bias) * self.log_scale.exp(), (pixels * self.log_scale.sum()).expand(x.shape[0])

    def inverse(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        pixels = z.shape[2] * z.shape[3]
        return z * (-self.log_scale).exp() - self.bias, (-pixels * self.log_scale.sum()).expand(z.shape[0])

