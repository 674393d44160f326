"""Invertible layers and the one composite that chains them."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from couplings.nn import mlp

__all__ = ["AdditiveCoupling", "AffineCoupling", "BatchNormFlow", "Composite", "DiagonalScaling", "Permutation", "Transform"]


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


class AffineCoupling(Transform):
    """Real NVP's affine coupling on a flat vector, optionally conditioned on a context.

    Entries where ``mask`` is True pass through and, with the context ``y`` (B, context_dim),
    set a scale and shift of the others: ``z_b = x_b * exp(s) + t`` with ``s = tanh(.)``
    bounded in (-1, 1). The net's last layer starts at zero, so the layer starts as the identity.

    References:
        Dinh, Sohl-Dickstein and Bengio, "Density estimation using Real NVP", 2017.
    """

    def __init__(self, mask: Tensor, hidden_layers: int, hidden_units: int, context_dim: int = 0):
        super().__init__()
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.dim() != 1 or mask.all() or not mask.any():
            raise ValueError(f"mask must be a 1-D boolean vector with both True and False entries, found {mask.tolist()}")
        self.register_buffer("mask", mask)
        self.context_dim = context_dim
        n_cond = int(mask.sum())
        self.net = mlp(n_cond + context_dim, 2 * (len(mask) - n_cond), hidden_layers, hidden_units)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _scale_shift(self, x_a: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.context_dim:
            if y is None or y.shape != (x_a.shape[0], self.context_dim):
                found = None if y is None else tuple(y.shape)
                raise ValueError(f"expected a context of shape ({x_a.shape[0]}, {self.context_dim}), found {found}")
            x_a = torch.cat([x_a, y.to(x_a.dtype)], dim=1)
        s, t = self.net(x_a).chunk(2, dim=1)
        return torch.tanh(s), t

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        s, t = self._scale_shift(x[:, self.mask], y)
        z = x.clone()
        z[:, ~self.mask] = x[:, ~self.mask] * s.exp() + t
        return z, s.sum(1)

    def inverse(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        s, t = self._scale_shift(z[:, self.mask], y)
        x = z.clone()
        x[:, ~self.mask] = (z[:, ~self.mask] - t) * (-s).exp()
        return x, -s.sum(1)


class BatchNormFlow(Transform):
    """Batch normalisation as an invertible layer, with its log-determinant.

    In training mode ``forward`` normalises with the batch statistics (treated as constants
    in the log-det, as in Real NVP) and updates running averages; in eval mode, and always in
    ``inverse``, the running averages are used, so sample in eval mode.

    References:
        Dinh et al., Real NVP, 2017, section 3.7.
    """

    def __init__(self, dim: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.log_gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.training:
            mean, var = x.mean(0), x.var(0, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(x.var(0, unbiased=True) if len(x) > 1 else var, self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        z = (x - mean) * torch.rsqrt(var + self.eps) * self.log_gamma.exp() + self.beta
        logabsdet = (self.log_gamma - 0.5 * torch.log(var + self.eps)).sum()
        return z, logabsdet.expand(x.shape[0])

    def inverse(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        mean, var = self.running_mean, self.running_var
        x = (z - self.beta) * (-self.log_gamma).exp() * torch.sqrt(var + self.eps) + mean
        logabsdet = -(self.log_gamma - 0.5 * torch.log(var + self.eps)).sum()
        return x, logabsdet.expand(z.shape[0])


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
