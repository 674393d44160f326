"""The parts an image coupling is composed of (`couplings.transforms.coupling`,
`couplings.transforms.mixture`): the mask that says which part passes through (`Checkerboard`,
`ChannelSplit`), the scale function of an affine coupling (`TanhScale`, `SigmoidScale`,
`BoundedScale`), and the conditioner, the one convention for what else a coupling's network sees
(`Context`: a tensor given as ``y``; `OneHotLabels`: labels given as ``y``), used by the flat
`AffineCoupling` too."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from couplings.transforms.base import check_labels, per_sample_sum

__all__ = [
    "BoundedScale",
    "ChannelSplit",
    "Checkerboard",
    "Conditioner",
    "Context",
    "Mask",
    "OneHotLabels",
    "Scale",
    "SigmoidScale",
    "TanhScale",
    "checkerboard",
    "conditioned",
    "mask_and_conditioner",
]


class Context:
    """Conditioning on a tensor given as ``y``: (B, features) beside a flat vector, or (B,
    features, H, W) beside an image (e.g. the image a dequantization noise is conditioned on)."""

    def __init__(self, features: int):
        if features < 1:
            raise ValueError(f"a context needs >= 1 features, found {features}")
        self.features = features

    def __call__(self, y: Tensor | None, x_a: Tensor) -> Tensor:
        expected = (x_a.shape[0], self.features) if x_a.dim() == 2 else (self.features, *x_a.shape[2:])
        found = None if y is None else tuple(y.shape)
        if y is None or (tuple(y.shape) if x_a.dim() == 2 else tuple(y.shape[1:])) != expected:
            shape = expected if x_a.dim() == 2 else ("B", *expected)
            raise ValueError(f"expected a context of shape ({', '.join(map(str, shape))}), found {found}")
        return y.to(x_a.dtype)


class OneHotLabels:
    """Conditioning on labels given as ``y`` (B,) in 0..num_classes-1: the network sees each label
    as num_classes one-hot features, constant over an image (a class-conditional coupling)."""

    def __init__(self, num_classes: int):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, found {num_classes}")
        self.features = num_classes

    def __call__(self, y: Tensor | None, x_a: Tensor) -> Tensor:
        check_labels(y, x_a.shape[0], self.features)
        one_hot = F.one_hot(y.long(), self.features).to(x_a.dtype)  # (B, K)
        return one_hot if x_a.dim() == 2 else one_hot[:, :, None, None].expand(-1, -1, *x_a.shape[2:])


Conditioner = Context | OneHotLabels


def conditioned(conditioner: Conditioner | None, x_a: Tensor, y: Tensor | None) -> Tensor:
    """The network's input: the masked-in part, then what the conditioner makes of ``y``."""
    return x_a if conditioner is None else torch.cat([x_a, conditioner(y, x_a)], dim=1)



def checkerboard(height: int, width: int, parity: int = 0) -> Tensor:
    """(1, 1, H, W) float mask, 1 where (row + col) % 2 == parity."""
    rows, cols = torch.arange(height).view(-1, 1), torch.arange(width).view(1, -1)
    return ((rows + cols) % 2 == parity).float().view(1, 1, height, width)


class Checkerboard:
    """The spatial mask of an image coupling: the pixels where (row + col) % 2 == parity pass
    through, in every channel. The network sees the image with the others zeroed and the mask
    itself as one more channel; every channel is transformed."""

    def __init__(self, parity: int):
        self.parity = parity
        self._masks: dict = {}  # by (H, W, dtype, device, inference mode): no state, rebuilt on demand

    def sizes(self, channels: int) -> tuple[int, int]:
        """(input channels of the network, channels transformed)."""
        return channels + 1, channels

    def _of(self, x: Tensor) -> Tensor:
        """The (1, 1, H, W) mask of x's size, dtype and device, built once (and once more under
        inference mode, whose tensors autograd may not save)."""
        if torch.compiler.is_compiling():  # a traced graph builds its constants itself (no cache: no graph break)
            return checkerboard(x.shape[2], x.shape[3], self.parity).to(x)
        key = (x.shape[2], x.shape[3], x.dtype, x.device, torch.is_inference_mode_enabled())
        if key not in self._masks:
            self._masks[key] = checkerboard(x.shape[2], x.shape[3], self.parity).to(x)
        return self._masks[key]

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(the network's input, the part to transform: all of x, its masked-in pixels put back by `merge`)."""
        m = self._of(x)
        return torch.cat([x * m, m.expand(x.shape[0], 1, -1, -1)], 1), x

    def merge(self, x: Tensor, out: Tensor, log_det: Tensor) -> tuple[Tensor, Tensor]:
        """The coupling's output and per-sample log-det: ``out`` and its element-wise ``log_det``
        on the masked-out pixels, x unchanged (and 0) on the others."""
        keep = self._of(x).bool()
        log_det = log_det.to(torch.promote_types(log_det.dtype, x.dtype))  # a bf16 network's log-det summed in x's precision
        return torch.where(keep, x, out), per_sample_sum(torch.where(keep, 0.0, log_det))


class ChannelSplit:
    """The channel mask of an image coupling: one half of the channels (the first for parity 0)
    passes through and is the network's input; the other half is transformed."""

    def __init__(self, parity: int):
        self.parity = parity

    def sizes(self, channels: int) -> tuple[int, int]:
        if channels % 2:
            raise ValueError(f"a channel mask needs an even number of channels, found {channels}")
        return channels // 2, channels // 2

    def _halves(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a, b = x.chunk(2, dim=1)  # (B, C, H, W) -> 2 x (B, C/2, H, W)
        return (b, a) if self.parity else (a, b)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._halves(x)

    def merge(self, x: Tensor, out: Tensor, log_det: Tensor) -> tuple[Tensor, Tensor]:
        a = self._halves(x)[0]
        return torch.cat([out, a] if self.parity else [a, out], 1), per_sample_sum(log_det)


Mask = Checkerboard | ChannelSplit



class TanhScale(nn.Module):
    """Real NVP's scale: ``z_b = x_b * exp(s) + t`` with ``s = a * tanh(h)``, ``a`` a learned
    factor per channel, initialised at 0."""

    shift_first = False

    def __init__(self, channels: int):
        super().__init__()
        self.factor = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """(log scale, scale) from the network's output ``h``."""
        log_s = self.factor * torch.tanh(h)
        return log_s, log_s.exp()


class SigmoidScale(nn.Module):
    """Glow's scale: ``z_b = (x_b + t) * scale`` with ``scale = sigmoid(h + 2)``, which can only
    contract. As the official Glow code does, it shifts before it scales: that order keeps the
    inverse exact in float32 when a trained coupling contracts hard (scale ~1e-5 next to shifts
    ~10), where ``x_b * scale + t`` would round ``x_b * scale`` away against ``t``. ``min_scale``
    bounds it below: ``min_scale + (1 - min_scale) * sigmoid(h + 2)``; with 0 (the paper's form)
    a trained Glow can contract a pixel so hard that the float32 rounding of the layers after it
    is amplified past 1e-4 by the inverse."""

    shift_first = True

    def __init__(self, min_scale: float = 0.0):
        super().__init__()
        if not 0 <= min_scale < 1:
            raise ValueError(f"min_scale must be in [0, 1), found {min_scale}")
        self.min_scale = min_scale

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        if not self.min_scale:
            log_s = F.logsigmoid(h + 2.0)
            return log_s, log_s.exp()
        # lerp(min_scale, 1, sigmoid(h + 2)) written out, one multiply-add instead of two constant
        # tensors and a lerp; and x_b is scaled by it, not by exp(log(scale)).
        scale = torch.sigmoid(h + 2.0).mul(1.0 - self.min_scale).add_(self.min_scale)
        return torch.log(scale), scale


class BoundedScale(nn.Module):
    """A soft-clamped scale: ``z_b = (x_b + t) * exp(s)`` with ``s = c * tanh(h / c)``, ``c =
    exp(f)`` a learned bound per channel (``f`` starts at 0), so the coupling can expand as well
    as contract, never by more than ``exp(c)``."""

    shift_first = True

    def __init__(self, channels: int):
        super().__init__()
        self.log_bound = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        bound = self.log_bound.exp()
        log_s = bound * torch.tanh(h / bound)
        return log_s, log_s.exp()


Scale = TanhScale | SigmoidScale | BoundedScale
SCALES = ("tanh", "sigmoid", "bounded")


def mask_and_conditioner(mask: str, parity: int, context_channels: int, num_classes: int) -> tuple[Mask, Conditioner | None]:
    """The mask and the conditioner of an image coupling from the names the model configs use."""
    if mask not in ("checkerboard", "channel"):
        raise ValueError(f"mask must be 'checkerboard' or 'channel', found {mask!r}")
    if num_classes < 0 or (num_classes and context_channels):
        raise ValueError("num_classes must be >= 0 and not given with context_channels; "
                         f"found {num_classes}, {context_channels}")
    conditioner = Context(context_channels) if context_channels else OneHotLabels(num_classes) if num_classes else None
    return (Checkerboard(parity) if mask == "checkerboard" else ChannelSplit(parity)), conditioner
