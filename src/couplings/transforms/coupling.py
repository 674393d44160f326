"""Coupling layers: NICE's additive coupling and Real NVP / Glow affine couplings, on flat
vectors and on images with checkerboard or channel masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from couplings.nn import coupling_net, mlp
from couplings.transforms.base import Transform, check_labels, per_sample_sum

__all__ = ["AdditiveCoupling", "AffineCoupling", "AffineCoupling2d", "checkerboard"]


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


def checkerboard(height: int, width: int, parity: int = 0) -> Tensor:
    """(1, 1, H, W) float mask, 1 where (row + col) % 2 == parity."""
    rows, cols = torch.arange(height).view(-1, 1), torch.arange(width).view(1, -1)
    return ((rows + cols) % 2 == parity).float().view(1, 1, height, width)


class AffineCoupling2d(Transform):
    """Affine coupling on images with a checkerboard or a channel mask.

    The masked-in part ``x_a`` passes through and a network of it gives ``(h, t)``; the rest is
    scaled and shifted. Three forms of the scale:

    * ``scale="tanh"`` (Real NVP): ``x_b * exp(s) + t`` with ``s = a * tanh(h)`` and a learned
      per-channel factor ``a`` initialised at 0.
    * ``scale="sigmoid"`` (Glow): ``(x_b + t) * scale`` with ``scale = sigmoid(h + 2)``, which can
      only contract. As the official Glow code does, it shifts before it scales: that order keeps
      the inverse exact in float32 when a trained coupling contracts hard (scale ~1e-5 next to
      shifts ~10), where ``x_b * scale + t`` would round ``x_b * scale`` away against ``t``.
      ``min_scale`` bounds it below: ``min_scale + (1 - min_scale) * sigmoid(h + 2)``; with 0 (the
      paper's form) a trained Glow can contract a pixel so hard that the float32 rounding of the
      layers after it is amplified past 1e-4 by the inverse.
    * ``scale="bounded"``: ``(x_b + t) * exp(s)`` with ``s = c * tanh(h / c)``, ``c = exp(f)`` a
      learned per-channel bound (``f`` starts at 0): a soft clamp, so the coupling can expand as
      well as contract, never by more than ``exp(c)``.

    The network's last convolution starts at zero, so every form starts as the identity (Glow's
    as a fixed contraction by sigmoid(2)).

    Args:
        channels: Input channels C.
        mask: "checkerboard" (spatial, all channels) or "channel" (first or second half of C).
        parity: Which half is masked in (0 or 1); alternate it between layers.
        hidden: Channels of the network; blocks: its residual (or gated) blocks.
        net: "resnet" (Real NVP's weight-normed ResNet) or "gated" (`couplings.nn.GatedConvNet`).
        context_channels: Channels of an image-shaped context ``y`` (B, K, H, W) that the network
            also sees (e.g. the image a dequantization noise is conditioned on); 0 for none.
        num_classes: > 0: the context ``y`` is a batch of labels (B,) in 0..num_classes-1, and the
            network also sees each label as num_classes one-hot channels, constant over the image
            (a class-conditional coupling); 0 for none. Not together with ``context_channels``.

    References:
        Dinh et al., Real NVP, 2017; Kingma and Dhariwal, Glow, 2018; Ho et al., Flow++, 2019.
    """

    def __init__(self, channels: int, mask: str, parity: int, hidden: int, blocks: int, scale: str = "tanh",
                 min_scale: float = 0.0, *, net: str = "resnet", context_channels: int = 0, num_classes: int = 0):
        super().__init__()
        if num_classes < 0 or (num_classes and context_channels):
            raise ValueError("num_classes must be >= 0 and not given with context_channels; "
                             f"found {num_classes}, {context_channels}")
        self.num_classes = num_classes
        if not 0 <= min_scale < 1 or (min_scale and scale != "sigmoid"):
            raise ValueError(f"min_scale must be in [0, 1), and only with scale='sigmoid'; found {min_scale}")
        self.min_scale = min_scale
        if mask not in ("checkerboard", "channel"):
            raise ValueError(f"mask must be 'checkerboard' or 'channel', found {mask!r}")
        if scale not in ("tanh", "sigmoid", "bounded"):
            raise ValueError(f"scale must be 'tanh', 'sigmoid' or 'bounded', found {scale!r}")
        if mask == "channel" and channels % 2:
            raise ValueError(f"a channel mask needs an even number of channels, found {channels}")
        self.mask, self.parity, self.scale, self.context_channels = mask, parity, scale, context_channels
        if mask == "checkerboard":  # +1: the mask itself as input
            n_in, n_out = channels + 1, channels
        else:
            n_in, n_out = channels // 2, channels // 2
        self.net = coupling_net(net, n_in + context_channels + num_classes, 2 * n_out, hidden, blocks)
        # a in a * tanh(h), or f in c = exp(f): one per output channel, starting at 0
        self.tanh_factor = nn.Parameter(torch.zeros(1, n_out, 1, 1)) if scale == "tanh" else None
        self.log_bound = nn.Parameter(torch.zeros(1, n_out, 1, 1)) if scale == "bounded" else None
        self._masks: dict = {}  # checkerboard masks by (H, W, dtype, device): no state, rebuilt on demand

    def _scale_shift(self, x_a: Tensor, y: Tensor | None, m_out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(log scale, scale, shift) of the masked-out part, from the masked-in part ``x_a`` (and
        the context ``y``); with a checkerboard's ``m_out`` (1 on the masked-out pixels), log scale
        and shift are 0 elsewhere."""
        if self.context_channels:
            if y is None or y.shape[1] != self.context_channels or y.shape[2:] != x_a.shape[2:]:
                found = None if y is None else tuple(y.shape)
                raise ValueError(f"expected a context of shape (B, {self.context_channels}, "
                                 f"{x_a.shape[2]}, {x_a.shape[3]}), found {found}")
            x_a = torch.cat([x_a, y.to(x_a.dtype)], dim=1)
        elif self.num_classes:
            x_a = torch.cat([x_a, self._label_maps(y, x_a)], dim=1)
        h, t = self.net(x_a).chunk(2, dim=1)
        if self.scale == "tanh":
            log_s, scale = self.tanh_factor * torch.tanh(h), None
        elif self.scale == "bounded":
            bound = self.log_bound.exp()
            log_s, scale = bound * torch.tanh(h / bound), None
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

    def _couple(self, x: Tensor, y: Tensor | None, direction: int) -> tuple[Tensor, Tensor]:
        """direction +1: x_b -> x_b * scale + t (or (x_b + t) * scale); -1: the inverse. The
        masked-in part is the same before and after, so both directions compute the same (log
        scale, shift)."""
        if self.mask == "checkerboard":
            m, m_out = self._checkerboard(x)
            log_s, scale, t = self._scale_shift(torch.cat([x * m, m.expand(x.shape[0], 1, -1, -1)], 1), y, m_out)
            return self._affine(x, scale, t, direction), self._log_det(log_s, direction)
        a, b = x.chunk(2, dim=1)  # (B, C, H, W) -> 2 x (B, C/2, H, W)
        if self.parity:
            a, b = b, a
        log_s, scale, t = self._scale_shift(a, y)
        b = self._affine(b, scale, t, direction)
        return torch.cat([b, a] if self.parity else [a, b], 1), self._log_det(log_s, direction)

    def _label_maps(self, y: Tensor | None, x: Tensor) -> Tensor:
        """Labels (B,) as one-hot maps (B, num_classes, H, W) of ``x``'s size and dtype."""
        check_labels(y, x.shape[0], self.num_classes)
        one_hot = F.one_hot(y.long(), self.num_classes).to(x.dtype)  # (B, K)
        return one_hot[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])

    def _checkerboard(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The (1, 1, H, W) mask of x's size, dtype and device and its complement, built once (and
        once more under inference mode, whose tensors autograd may not save)."""
        key = (x.shape[2], x.shape[3], x.dtype, x.device, torch.is_inference_mode_enabled())
        if key not in self._masks:
            m = checkerboard(x.shape[2], x.shape[3], self.parity).to(x)
            self._masks[key] = (m, 1 - m)
        return self._masks[key]

    @staticmethod
    def _log_det(log_s: Tensor, direction: int) -> Tensor:
        ld = per_sample_sum(log_s)
        return ld if direction > 0 else -ld

    def _affine(self, x: Tensor, scale: Tensor, t: Tensor, direction: int) -> Tensor:
        if self.scale != "tanh":  # Glow's order: shift, then scale
            return (x + t) * scale if direction > 0 else x / scale - t
        return torch.addcmul(t, x, scale) if direction > 0 else (x - t) / scale

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(x, y, +1)

    def inverse(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(z, y, -1)
