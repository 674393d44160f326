"""Coupling layers: NICE's additive coupling and Real NVP / Glow affine couplings, on flat vectors
and on images. An image coupling is composed of parts, each an object
(`couplings.transforms.coupling_parts`): a mask, a network (`couplings.nn.coupling_net`), a scale
function, and optionally a conditioner; `affine_coupling2d` builds one from the names the model
configurations use. Flow++'s logistic-mixture coupling is in `couplings.transforms.mixture`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from couplings.nn import coupling_net, mlp
from couplings.transforms.base import Transform
from couplings.transforms.coupling_parts import (
    SCALES,
    BoundedScale,
    Conditioner,
    Mask,
    Scale,
    SigmoidScale,
    TanhScale,
    conditioned,
    mask_and_conditioner,
)

__all__ = ["AdditiveCoupling", "AffineCoupling", "AffineCoupling2d", "affine_coupling2d"]


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



class AffineCoupling(Transform):
    """Real NVP's affine coupling on a flat vector, optionally conditioned.

    Entries where ``mask`` is True pass through and (with what ``conditioner`` makes of ``y``) set
    a scale and shift of the others: ``z_b = x_b * exp(s) + t`` with ``s = tanh(.)`` bounded in
    (-1, 1). The net's last layer starts at zero, so the layer starts as the identity.

    References:
        Dinh, Sohl-Dickstein and Bengio, "Density estimation using Real NVP", 2017.
    """

    def __init__(self, mask: Tensor, hidden_layers: int, hidden_units: int, conditioner: Conditioner | None = None):
        super().__init__()
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.dim() != 1 or mask.all() or not mask.any():
            raise ValueError(f"mask must be a 1-D boolean vector with both True and False entries, found {mask.tolist()}")
        self.register_buffer("mask", mask)
        self.conditioner = conditioner
        n_cond = int(mask.sum()) + (conditioner.features if conditioner else 0)
        self.net = mlp(n_cond, 2 * (len(mask) - int(mask.sum())), hidden_layers, hidden_units)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _scale_shift(self, x_a: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        s, t = self.net(conditioned(self.conditioner, x_a, y)).chunk(2, dim=1)
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



class AffineCoupling2d(Transform):
    """Affine coupling on images: the part of the image that ``mask`` lets through passes
    unchanged and, through ``net`` (and what ``conditioner`` makes of ``y``), gives ``(h, t)``;
    ``scale`` turns ``h`` into the scale of the rest, and shifts by ``t`` before or after it.

    The network's last convolution starts at zero, so every scale starts as the identity (Glow's
    as a fixed contraction by sigmoid(2)). `affine_coupling2d` builds one from names.

    Args:
        mask: `Checkerboard` or `ChannelSplit`; alternate its parity between layers.
        net: Maps the network's input channels to 2 per transformed channel (`Mask.sizes`).
        scale: `TanhScale` (Real NVP), `SigmoidScale` (Glow) or `BoundedScale`.
        conditioner: `Context` or `OneHotLabels`, or None for an unconditional coupling.

    References:
        Dinh et al., Real NVP, 2017; Kingma and Dhariwal, Glow, 2018; Ho et al., Flow++, 2019.
    """

    def __init__(self, mask: Mask, net: nn.Module, scale: Scale, conditioner: Conditioner | None = None):
        super().__init__()
        # The scale before the network: the parameters' order (and so an optimizer state's) is
        # that of the checkpoints written when the scale's parameters were the coupling's own.
        self.mask, self.scale, self.net, self.conditioner = mask, scale, net, conditioner

    def _couple(self, x: Tensor, y: Tensor | None, direction: int) -> tuple[Tensor, Tensor]:
        """direction +1: x_b -> x_b * scale + t (or (x_b + t) * scale); -1: the inverse. The
        masked-in part is the same before and after, so both directions compute the same (log
        scale, shift)."""
        net_in, x_b = self.mask.split(x)
        h, t = self.net(conditioned(self.conditioner, net_in, y)).chunk(2, dim=1)
        log_s, scale = self.scale(h)
        if self.scale.shift_first:  # Glow's order
            out = (x_b + t) * scale if direction > 0 else x_b / scale - t
        else:
            out = torch.addcmul(t, x_b, scale) if direction > 0 else (x_b - t) / scale
        return self.mask.merge(x, out, log_s if direction > 0 else -log_s)

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(x, y, +1)

    def inverse(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(z, y, -1)


def affine_coupling2d(channels: int, mask: str, parity: int, hidden: int, blocks: int, scale: str = "tanh",
                      min_scale: float = 0.0, *, net: str = "resnet", context_channels: int = 0,
                      num_classes: int = 0) -> AffineCoupling2d:
    """An `AffineCoupling2d` from the names the model configurations use.

    Args:
        channels: Input channels C.
        mask: "checkerboard" (`Checkerboard`) or "channel" (`ChannelSplit`); parity: 0 or 1.
        hidden: Channels of the network; blocks: its residual (or gated) blocks.
        scale: "tanh" (`TanhScale`), "sigmoid" (`SigmoidScale`, with ``min_scale``) or "bounded"
            (`BoundedScale`).
        net: "resnet" (Real NVP's weight-normed ResNet) or "gated" (`couplings.nn.GatedConvNet`).
        context_channels: > 0: condition on an image-shaped ``y`` of so many channels (`Context`).
        num_classes: > 0: condition on labels ``y`` (`OneHotLabels`). Not with ``context_channels``.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be 'tanh', 'sigmoid' or 'bounded', found {scale!r}")
    if min_scale and scale != "sigmoid":
        raise ValueError(f"min_scale must be in [0, 1), and only with scale='sigmoid'; found {min_scale}")
    masking, conditioner = mask_and_conditioner(mask, parity, context_channels, num_classes)
    n_in, n_out = masking.sizes(channels)
    scaling = {"tanh": lambda: TanhScale(n_out), "sigmoid": lambda: SigmoidScale(min_scale),
               "bounded": lambda: BoundedScale(n_out)}[scale]()
    network = coupling_net(net, n_in + (conditioner.features if conditioner else 0), 2 * n_out, hidden, blocks)
    return AffineCoupling2d(masking, network, scaling, conditioner)
