"""Invertible layers on image tensors (B, C, H, W): logit preprocessing, squeeze, ActNorm,
invertible 1x1 convolution, batch norm, and affine couplings with checkerboard or channel masks.

Every layer follows the `couplings.transforms.Transform` contract.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from couplings.nn import ResNet
from couplings.transforms import Transform

__all__ = ["ActNorm", "AffineCoupling2d", "BatchNorm2dFlow", "InvConv1x1", "Logit", "Squeeze", "checkerboard"]


def _per_sample_sum(x: Tensor) -> Tensor:
    return x.flatten(1).sum(1)


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
        logabsdet = _per_sample_sum(math.log(1 - 2 * self.alpha) - log_p - log_1mp)
        return z, logabsdet

    def inverse(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        p = torch.sigmoid(z)
        x = (p - self.alpha) / (1 - 2 * self.alpha)
        logabsdet = _per_sample_sum(F.logsigmoid(z) + F.logsigmoid(-z) - math.log(1 - 2 * self.alpha))
        return x, logabsdet


class Squeeze(Transform):
    """Trades space for channels: (B, C, H, W) -> (B, 4C, H/2, W/2), volume-preserving."""

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"squeeze needs even height and width, found {h}x{w}")
        x = x.reshape(b, c, h // 2, 2, w // 2, 2)  # (B, C, H/2, 2, W/2, 2)
        x = x.permute(0, 1, 3, 5, 2, 4)  # (B, C, 2, 2, H/2, W/2)
        return x.reshape(b, 4 * c, h // 2, w // 2), x.new_zeros(b)

    def inverse(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b, c4, h, w = z.shape
        z = z.reshape(b, c4 // 4, 2, 2, h, w)  # (B, C, 2, 2, H/2, W/2)
        z = z.permute(0, 1, 4, 2, 5, 3)  # (B, C, H/2, 2, W/2, 2)
        return z.reshape(b, c4 // 4, 2 * h, 2 * w), z.new_zeros(b)


class ActNorm(Transform):
    """Per-channel ``z = (x + bias) * exp(log_scale)``, initialised from the first batch it sees
    so that the outputs have zero mean and unit variance per channel. The ``initialized`` flag is
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
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
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


class InvConv1x1(Transform):
    """Invertible 1x1 convolution in LU form: ``W = P L (U + diag(sign * exp(log_s)))``, with P
    fixed, L unit lower-triangular and U strictly upper-triangular; log-det ``H W sum(log_s)``.
    Initialised at a random rotation.

    References:
        Kingma and Dhariwal, Glow, 2018, section 3.2.
    """

    def __init__(self, channels: int, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        rotation, _ = torch.linalg.qr(torch.randn(channels, channels, generator=generator))
        p, lower, upper = torch.linalg.lu(rotation)
        diagonal = torch.diagonal(upper)
        self.register_buffer("permutation", p)
        self.register_buffer("sign", torch.sign(diagonal))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(diagonal.abs()))

    def _weight(self) -> Tensor:
        eye = torch.eye(len(self.sign), dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign * self.log_s.exp())
        return self.permutation @ lower @ upper

    @staticmethod
    def _mix(weight: Tensor, x: Tensor) -> Tensor:
        """The 1x1 convolution ``out[b, i] = sum_j weight[i, j] x[b, j]`` as one (C, C) @ (C, B*H*W)
        matrix product: at a few channels that, with the two transposing copies, takes about half
        the time of ``F.conv2d`` with a 1x1 kernel, forward and backward."""
        b, c, h, w = x.shape
        out = weight @ x.transpose(0, 1).reshape(c, b * h * w)
        return out.view(c, b, h, w).transpose(0, 1).contiguous()

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z = self._mix(self._weight(), x)
        return z, (x.shape[2] * x.shape[3] * self.log_s.sum()).expand(x.shape[0])

    def inverse(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = self._mix(torch.linalg.inv(self._weight()), z)
        return x, (-z.shape[2] * z.shape[3] * self.log_s.sum()).expand(z.shape[0])


class BatchNorm2dFlow(Transform):
    """Per-channel batch normalisation of images as an invertible layer (Real NVP, section 3.7).

    Training mode uses batch statistics and updates running averages; eval mode and ``inverse``
    use the running averages.
    """

    def __init__(self, channels: int, momentum: float = 0.05, eps: float = 1e-4):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.log_gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("running_mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("running_var", torch.ones(1, channels, 1, 1))

    def _log_det(self, var: Tensor, pixels: int) -> Tensor:
        return pixels * (self.log_gamma - 0.5 * torch.log(var + self.eps)).sum()

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.training:
            mean = x.mean(dim=(0, 2, 3), keepdim=True)
            var = x.var(dim=(0, 2, 3), keepdim=True, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var, self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        z = (x - mean) * torch.rsqrt(var + self.eps) * self.log_gamma.exp() + self.beta
        return z, self._log_det(var, x.shape[2] * x.shape[3]).expand(x.shape[0])

    def inverse(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        mean, var = self.running_mean, self.running_var
        x = (z - self.beta) * (-self.log_gamma).exp() * torch.sqrt(var + self.eps) + mean
        return x, -self._log_det(var, z.shape[2] * z.shape[3]).expand(z.shape[0])


def checkerboard(height: int, width: int, parity: int = 0) -> Tensor:
    """(1, 1, H, W) float mask, 1 where (row + col) % 2 == parity."""
    rows, cols = torch.arange(height).view(-1, 1), torch.arange(width).view(1, -1)
    return ((rows + cols) % 2 == parity).float().view(1, 1, height, width)


class AffineCoupling2d(Transform):
    """Affine coupling on images with a checkerboard or a channel mask.

    The masked-in part ``x_a`` passes through and a ResNet of it gives ``(h, t)``; the rest
    becomes ``x_b * scale + t``. ``scale="tanh"`` (Real NVP) uses ``log scale = a * tanh(h)``
    with a learned per-channel factor ``a`` initialised at 0; ``scale="sigmoid"`` (Glow) uses
    ``scale = sigmoid(h + 2)`` and, as the official Glow code does, shifts before it scales:
    ``(x_b + t) * scale``. That order keeps the inverse exact in float32 when a trained
    coupling contracts hard (scale ~1e-5 next to shifts ~10): ``x_b * scale + t`` would round
    ``x_b * scale`` away against ``t``. The ResNet's last convolution starts at zero.

    ``min_scale`` (sigmoid only) bounds the scale below: ``min_scale + (1 - min_scale) *
    sigmoid(h + 2)``. With 0 (the paper's form) a trained Glow can contract a pixel by 1e-5, and
    the float32 rounding of the layers after it then costs the inverse up to 1e-5 / 1e-5 ~ 1:
    the map is invertible on paper but not in float32. A bound caps that amplification per layer.

    Args:
        channels: Input channels C.
        mask: "checkerboard" (spatial, all channels) or "channel" (first or second half of C).
        parity: Which half is masked in (0 or 1); alternate it between layers.
        hidden: Channels of the ResNet; blocks: its residual blocks.

    References:
        Dinh et al., Real NVP, 2017; Kingma and Dhariwal, Glow, 2018.
    """

    def __init__(self, channels: int, mask: str, parity: int, hidden: int, blocks: int, scale: str = "tanh",
                 min_scale: float = 0.0):
        super().__init__()
        if not 0 <= min_scale < 1 or (min_scale and scale != "sigmoid"):
            raise ValueError(f"min_scale must be in [0, 1), and only with scale='sigmoid'; found {min_scale}")
        self.min_scale = min_scale
        if mask not in ("checkerboard", "channel"):
            raise ValueError(f"mask must be 'checkerboard' or 'channel', found {mask!r}")
        if scale not in ("tanh", "sigmoid"):
            raise ValueError(f"scale must be 'tanh' or 'sigmoid', found {scale!r}")
        if mask == "channel" and channels % 2:
            raise ValueError(f"a channel mask needs an even number of channels, found {channels}")
        self.mask, self.parity, self.scale = mask, parity, scale
        if mask == "checkerboard":
            self.net = ResNet(channels + 1, 2 * channels, hidden, blocks)  # +1: the mask itself as input
            n_out = channels
        else:
            self.net = ResNet(channels // 2, channels, hidden, blocks)
            n_out = channels // 2
        self.tanh_factor = nn.Parameter(torch.zeros(1, n_out, 1, 1)) if scale == "tanh" else None
        self._masks: dict = {}  # checkerboard masks by (H, W, dtype, device): no state, rebuilt on demand

    def _scale_shift(self, x_a: Tensor, m_out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(log scale, scale, shift) of the masked-out part, from the masked-in part ``x_a``; with a
        checkerboard's ``m_out`` (1 on the masked-out pixels), log scale and shift are 0 elsewhere."""
        h, t = self.net(x_a).chunk(2, dim=1)
        if self.scale == "tanh":
            log_s, scale = self.tanh_factor * torch.tanh(h), None
        elif self.min_scale:
            # lerp(min_scale, 1, sigmoid(h + 2)) written out, one multiply-add instead of two
            # constant tensors and a lerp; and x_b is scaled by it, not by exp(log(scale)).
            scale = torch.sigmoid(h + 2.0).mul(1.0 - self.min_scale).add_(self.min_scale)
            log_s = torch.log(scale)
        else:
            log_s, scale = F.logsigmoid(h + 2.0), None
        if m_out is not None:  # the masked-in pixels are left as they are
            log_s, t, scale = log_s * m_out, t * m_out, None
        return log_s, log_s.exp() if scale is None else scale, t

    def _couple(self, x: Tensor, direction: int) -> tuple[Tensor, Tensor]:
        """direction +1: x_b -> x_b * scale + t; -1: the inverse. The masked-in part is the same
        before and after, so both directions compute the same (log scale, shift)."""
        if self.mask == "checkerboard":
            m, m_out = self._checkerboard(x)
            log_s, scale, t = self._scale_shift(torch.cat([x * m, m.expand(x.shape[0], 1, -1, -1)], 1), m_out)
            return self._affine(x, scale, t, direction), self._log_det(log_s, direction)
        a, b = x.chunk(2, dim=1)  # (B, C, H, W) -> 2 x (B, C/2, H, W)
        if self.parity:
            a, b = b, a
        log_s, scale, t = self._scale_shift(a)
        b = self._affine(b, scale, t, direction)
        return torch.cat([b, a] if self.parity else [a, b], 1), self._log_det(log_s, direction)

    def _checkerboard(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The (1, 1, H, W) mask of x's size, dtype and device and its complement, built once."""
        key = (x.shape[2], x.shape[3], x.dtype, x.device)
        if key not in self._masks:
            m = checkerboard(x.shape[2], x.shape[3], self.parity).to(x)
            self._masks[key] = (m, 1 - m)
        return self._masks[key]

    @staticmethod
    def _log_det(log_s: Tensor, direction: int) -> Tensor:
        ld = _per_sample_sum(log_s)
        return ld if direction > 0 else -ld

    def _affine(self, x: Tensor, scale: Tensor, t: Tensor, direction: int) -> Tensor:
        if self.scale == "sigmoid":  # Glow: shift, then scale
            return (x + t) * scale if direction > 0 else x / scale - t
        return torch.addcmul(t, x, scale) if direction > 0 else (x - t) / scale

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(x, +1)

    def inverse(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(z, -1)
