"""Linear invertible layers: NICE's diagonal scaling, fixed permutations, Glow's 1x1 convolution."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from couplings.transforms.base import Transform, share_mean

__all__ = ["DiagonalScaling", "InvConv1x1", "Permutation"]


class DiagonalScaling(Transform):
    """``z = exp(s) * x`` with a learned ``s``; log-det ``sum(s)``.

    ``init="zero"`` starts at ``s = 0`` (the paper). ``init="data"`` sets ``s`` from the first
    batch it sees, so that every output has standard deviation ``target_std`` (the prior's), where
    Adam would otherwise walk ``s`` there from 0 at about its learning rate per step. The
    ``initialized`` flag is a buffer (only with ``init="data"``), so a loaded model never
    re-initialises.

    References:
        Dinh et al., NICE, 2014, section 3.3 (the only volume change in NICE).
    """

    def __init__(self, dim: int, init: str = "zero", target_std: float = 1.0):
        super().__init__()
        if init not in ("zero", "data"):
            raise ValueError(f"init must be 'zero' or 'data', found {init!r}")
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.target_std = target_std
        if init == "data":
            self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        mean = share_mean(x.mean(dim=0))  # of the global batch, when processes share it
        std = share_mean((x - mean).square().mean(dim=0)).sqrt()
        self.log_scale.copy_(torch.log(self.target_std / (std + 1e-6)))
        self.initialized.fill_(True)

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if hasattr(self, "initialized") and not self.initialized:
            self._initialize(x)
        return x * self.log_scale.exp(), self.log_scale.sum().expand(x.shape[0])

    def inverse(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z * (-self.log_scale).exp(), -self.log_scale.sum().expand(z.shape[0])


class Permutation(Transform):
    """A fixed random permutation of the entries (stored as a buffer, so it survives save/load)."""

    def __init__(self, dim: int, seed: int = 0):
        super().__init__()
        order = torch.randperm(dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("order", order)
        self.register_buffer("inverse_order", torch.argsort(order))

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x[:, self.order], x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z[:, self.inverse_order], z.new_zeros(z.shape[0])


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

