"""Invertible layers and the one composite that chains them."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from couplings.nn import mlp

__all__ = ["AdditiveCoupling", "Composite", "DiagonalScaling", "Transform"]


class Transform(nn.Module):
    """An invertible map between data space and noise space.

    Every subclass MUST implement both directions with this contract:

    * ``forward(x, y=None) -> (z, logabsdet)`` maps data ``x`` to noise ``z``;
    * ``inverse(z, y=None) -> (x, logabsdet)`` maps noise back to data;
    * ``logabsdet`` has shape ``(B,)`` and is ``log |det dz/dx|`` for ``forward`` and
      ``log |det dx/dz|`` for ``inverse``, so the two sum to zero on a round trip;
    * ``y`` is an optional context (e.g. a class label) that a layer may ignore.
    """

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class Composite(Transform):
    """Applies transforms in order (``forward``) or in reverse order (``inverse``)."""

    def __init__(self, transforms: Iterable[Transform]):
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        logabsdet = x.new_zeros(x.shape[0])
        for t in self.transforms:
            x, ld = t(x, y)
            logabsdet = logabsdet + ld
        return x, logabsdet

    def inverse(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        logabsdet = z.new_zeros(z.shape[0])
        for t in reversed(self.transforms):
            z, ld = t.inverse(z, y)
            logabsdet = logabsdet + ld
        return z, logabsdet


class AdditiveCoupling(Transform):
    """NICE's additive coupling on an odd/even split of a flat vector.

    The entries at indices ``parity, parity + 2, ...`` pass through unchanged and condition
    a shift of the others: ``z_b = x_b + m(x_a)``. The Jacobian is unit triangular, so the
    log-determinant is zero. Alternate ``parity`` between layers to swap the halves' roles.

    References:
        Dinh, Krueger and Bengio, "NICE: Non-linear Independent Components Estimation", 2014.
    """

    def __init__(self, dim: int, parity: int, hidden_layers: int, hidden_units: int):
        super().__init__()
        if dim < 2:
            raise ValueError(f"a coupling needs dim >= 2, found {dim}")
        if parity not in (0, 1):
            raise ValueError(f"parity must be 0 or 1, found {parity}")
        self.parity = parity
        n_cond = len(range(parity, dim, 2))
        self.shift = mlp(n_cond, dim - n_cond, hidden_layers, hidden_units)

    def _shifted(self, x: Tensor, sign: float) -> Tensor:
        a, b = self.parity, 1 - self.parity
        out = x.clone()
        out[:, b::2] = x[:, b::2] + sign * self.shift(x[:, a::2])
        return out

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._shifted(x, 1.0), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._shifted(z, -1.0), z.new_zeros(z.shape[0])


class DiagonalScaling(Transform):
    """``z = exp(s) * x`` with a learned ``s`` initialised at 0; log-det ``sum(s)``.

    References:
        Dinh et al., NICE, 2014, section 3.3 (the only volume change in NICE).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x * self.log_scale.exp(), self.log_scale.sum().expand(x.shape[0])

    def inverse(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z * (-self.log_scale).exp(), -self.log_scale.sum().expand(z.shape[0])
