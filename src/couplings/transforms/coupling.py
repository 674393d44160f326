"""Coupling layers: NICE's additive coupling, Real NVP / Glow affine couplings on flat vectors
and on images, and Flow++'s logistic-mixture CDF coupling on images.

An image coupling is composed of parts, each an object: a mask (`Checkerboard`, `ChannelSplit`:
which part passes through), a network (`couplings.nn.coupling_net`), for the affine coupling a
scale function (`TanhScale`, `SigmoidScale`, `BoundedScale`), and optionally a conditioner, the
one convention for what else the network sees (`Context`: a tensor given as ``y``; `OneHotLabels`:
labels given as ``y``). `affine_coupling2d` and `mixture_coupling2d` build them from the names the
model configurations use."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from couplings.nn import coupling_net, mlp
from couplings.transforms.base import Transform, check_labels, per_sample_sum

__all__ = [
    "AdditiveCoupling",
    "AffineCoupling",
    "AffineCoupling2d",
    "BoundedScale",
    "ChannelSplit",
    "Checkerboard",
    "Context",
    "MixtureCoupling2d",
    "OneHotLabels",
    "SigmoidScale",
    "TanhScale",
    "affine_coupling2d",
    "checkerboard",
    "mixture_coupling2d",
]


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


def _conditioned(conditioner: Conditioner | None, x_a: Tensor, y: Tensor | None) -> Tensor:
    """The network's input: the masked-in part, then what the conditioner makes of ``y``."""
    return x_a if conditioner is None else torch.cat([x_a, conditioner(y, x_a)], dim=1)


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
        s, t = self.net(_conditioned(self.conditioner, x_a, y)).chunk(2, dim=1)
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
        h, t = self.net(_conditioned(self.conditioner, net_in, y)).chunk(2, dim=1)
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


def _mask_and_conditioner(mask: str, parity: int, context_channels: int, num_classes: int):
    if mask not in ("checkerboard", "channel"):
        raise ValueError(f"mask must be 'checkerboard' or 'channel', found {mask!r}")
    if num_classes < 0 or (num_classes and context_channels):
        raise ValueError("num_classes must be >= 0 and not given with context_channels; "
                         f"found {num_classes}, {context_channels}")
    conditioner = Context(context_channels) if context_channels else OneHotLabels(num_classes) if num_classes else None
    return (Checkerboard(parity) if mask == "checkerboard" else ChannelSplit(parity)), conditioner


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
    masking, conditioner = _mask_and_conditioner(mask, parity, context_channels, num_classes)
    n_in, n_out = masking.sizes(channels)
    scaling = {"tanh": lambda: TanhScale(n_out), "sigmoid": lambda: SigmoidScale(min_scale),
               "bounded": lambda: BoundedScale(n_out)}[scale]()
    network = coupling_net(net, n_in + (conditioner.features if conditioner else 0), 2 * n_out, hidden, blocks)
    return AffineCoupling2d(masking, network, scaling, conditioner)


class MixtureCoupling2d(Transform):
    """Flow++'s logistic-mixture CDF coupling on images, with a checkerboard or a channel mask.

    The masked-in part ``x_a`` passes through; a network of it gives, for every element of the
    other part, K mixture logits, K means ``mu_k``, K log-scales ``log s_k`` (clamped to >= -7)
    and an affine log-scale ``a`` and shift ``b``, and

        ``z_b = logit(F(x_b)) * exp(a) + b``,  ``F(x) = sum_k pi_k sigmoid((x - mu_k) / s_k)``,

    the CDF of a mixture of K logistics (``pi = softmax(logits)``). ``a = c * tanh(h / c)`` with a
    learned per-channel bound ``c`` (``log c`` starts at 0), as in `AffineCoupling2d`'s
    ``scale="bounded"``. The log-determinant per element is
    ``log f(x) - log F(x) - log(1 - F(x)) + a`` with ``f`` the mixture's density; ``log F``,
    ``log(1 - F)`` and ``log f`` are computed in log space (a logsumexp over the components of
    ``log pi_k + logsigmoid(+-u_k)``, ``u_k = (x - mu_k) / s_k``), so nothing saturates in
    float32 in the tails, and ``logit(F) = log F - log(1 - F)``.

    The parts are those of `AffineCoupling2d`, with the bound of ``a`` as ``scale``
    (`mixture_coupling2d` builds one from names). The network's last convolution starts at zero: equal weights, ``mu = 0``, ``s = 1``, ``a = b =
    0``, so ``F`` is the logistic sigmoid and the layer starts as the identity.

    The inverse has no closed form: ``logit(F(x)) = (z_b - b) exp(-a)`` is solved per element by
    bisection (``logit F`` is increasing in ``x``); see `_bisect`. It costs some 60 (float32) or
    100 (float64) evaluations of the mixture, so sampling is slower than with an affine coupling;
    the forward pass (training, scoring) is a single evaluation.

    Args:
        mask: `Checkerboard` or `ChannelSplit`.
        net: Maps the network's input channels to ``3K + 2`` per transformed channel.
        scale: The `BoundedScale` of ``a``, one bound per transformed channel.
        mixtures: K, the logistics in the mixture.
        conditioner: `Context` or `OneHotLabels`, or None.

    References:
        Ho, Chen, Srinivas, Duan and Abbeel, "Flow++: Improving Flow-Based Generative Models with
        Variational Dequantization and Architecture Design", 2019, section 3.2.
    """

    MIN_LOG_SCALE = -7.0  # the logistics' log-scales are clamped here: s >= 1e-3, so u = (x - mu) / s stays finite

    def __init__(self, mask: Mask, net: nn.Module, scale: BoundedScale, mixtures: int,
                 conditioner: Conditioner | None = None):
        super().__init__()
        if mixtures < 1:
            raise ValueError(f"mixtures must be >= 1, found {mixtures}")
        # The scale before the network, as in `AffineCoupling2d`.
        self.mask, self.scale, self.net, self.conditioner, self.mixtures = mask, scale, net, conditioner, mixtures

    def _mixture_params(self, x_a: Tensor, y: Tensor | None) -> tuple[Tensor, ...]:
        """(a, b, log pi, mu, log s) from the network's input: a and b (B, C', H, W), the others
        (B, K, C', H, W), in at least float32 (and in x's dtype) even when the network ran in bf16."""
        h = self.net(_conditioned(self.conditioner, x_a, y))
        h = h.to(torch.promote_types(h.dtype, x_a.dtype)).unflatten(1, (3 * self.mixtures + 2, -1))
        k = self.mixtures
        a = self.scale(h[:, 0])[0]
        log_pi = torch.log_softmax(h[:, 2 : 2 + k], dim=1)
        log_s = h[:, 2 + 2 * k :].clamp(min=self.MIN_LOG_SCALE)
        return a, h[:, 1], log_pi, h[:, 2 + k : 2 + 2 * k], log_s

    @staticmethod
    def _logit_cdf(x: Tensor, log_pi: Tensor, mu: Tensor, log_s: Tensor,
                   slope: bool = True) -> tuple[Tensor, Tensor | None]:
        """(logit F(x), log f(x) - log F(x) - log(1 - F(x))) of the mixture at ``x`` (B, C', H, W),
        computed in log space; the second (None unless ``slope``) is log d logit F / dx, the
        log-det without ``a``."""
        u = (x.unsqueeze(1) - mu) * torch.exp(-log_s)
        log_cdf_k, log_sf_k = F.logsigmoid(u), F.logsigmoid(-u)  # log sigmoid(u_k), log(1 - sigmoid(u_k))
        log_cdf = torch.logsumexp(log_pi + log_cdf_k, dim=1)
        log_sf = torch.logsumexp(log_pi + log_sf_k, dim=1)
        if not slope:
            return log_cdf - log_sf, None
        log_pdf = torch.logsumexp(log_pi + log_cdf_k + log_sf_k - log_s, dim=1)
        return log_cdf - log_sf, log_pdf - log_cdf - log_sf

    @staticmethod
    def _bisect(target: Tensor, log_pi: Tensor, mu: Tensor, log_s: Tensor) -> Tensor:
        """The x with logit F(x) = target, per element, by bisection (no gradient).

        The bracket provably holds the root: logistic k alone reaches logit-CDF ``target`` at
        ``r_k = mu_k + s_k target``, and every component's CDF increases in x, so at
        ``lo = min_k r_k`` every sigmoid(u_k) is <= sigmoid(target) and so is their mixture F;
        at ``hi = max_k r_k`` each is >= it. (With K = 1, lo = hi is the closed-form answer.)

        Steps: each halves the bracket, whose width is the spread of the r_k (tens for means and
        targets of tens and scales near 1; ~1e7 for targets of 1e4 and scales of e^6, tested);
        after n steps the error is at most width * 2^-n, or one float spacing once lo and hi are
        neighbours. 60 steps take any width up to 1e9 below 1e-9, under float32's spacing (6e-8
        at 1) and far under the round trip's 1e-4 (tested: 1e-5); float64 gets 100 steps, enough
        for its spacing (2e-16 at 1) up to widths of 1e14. A fixed count, not a tolerance, keeps
        the inverse free of data-dependent loops and synchronisations.
        """
        with torch.no_grad():
            roots = mu + torch.exp(log_s) * target.unsqueeze(1)
            lo, hi = roots.amin(dim=1), roots.amax(dim=1)
            for _ in range(100 if target.dtype == torch.float64 else 60):
                mid = lo + (hi - lo) / 2
                above = MixtureCoupling2d._logit_cdf(mid, log_pi, mu, log_s, slope=False)[0] > target
                hi = torch.where(above, mid, hi)
                lo = torch.where(above, lo, mid)
            return lo + (hi - lo) / 2

    def _forward_b(self, x_b: Tensor, params: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        a, b, log_pi, mu, log_s = params
        logit_cdf, log_slope = self._logit_cdf(x_b, log_pi, mu, log_s)
        return logit_cdf * torch.exp(a) + b, log_slope + a

    def _inverse_b(self, z_b: Tensor, params: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        a, b, log_pi, mu, log_s = params
        target = (z_b - b) * torch.exp(-a)
        x_b = self._bisect(target.detach(), log_pi.detach(), mu.detach(), log_s.detach())
        if torch.is_grad_enabled() and any(t.requires_grad for t in (target, log_pi, mu, log_s)):
            # Bisection has no useful gradient. Add zero in value, with the gradient of the exact
            # root (implicit function theorem): dx = (d target - d logit F |_x fixed) / (logit F)'(x),
            # the slope taken by autograd, not from the log-det formula, so that a test of the
            # inverse's log-det against its Jacobian checks that formula independently.
            leaf = x_b.detach().requires_grad_(True)
            logit_cdf = self._logit_cdf(leaf, log_pi.detach(), mu.detach(), log_s.detach(), slope=False)[0]
            slope = torch.autograd.grad(logit_cdf.sum(), leaf)[0]  # each element's depends on its own x only
            residual = target - self._logit_cdf(x_b, log_pi, mu, log_s, slope=False)[0]
            x_b = x_b + (residual - residual.detach()) / slope.clamp(min=torch.finfo(x_b.dtype).tiny)
        _, log_slope = self._logit_cdf(x_b, log_pi, mu, log_s)
        return x_b, -(log_slope + a)

    def _couple(self, x: Tensor, y: Tensor | None, direction: int) -> tuple[Tensor, Tensor]:
        """direction +1: the forward map of the masked-out part; -1: its inverse. The masked-in part
        is the same before and after, so both directions see the same parameters."""
        net_in, x_b = self.mask.split(x)
        out, log_det = (self._forward_b if direction > 0 else self._inverse_b)(x_b, self._mixture_params(net_in, y))
        return self.mask.merge(x, out, log_det)

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(x, y, +1)

    def inverse(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(z, y, -1)


def mixture_coupling2d(channels: int, mask: str, parity: int, hidden: int, blocks: int, mixtures: int = 8, *,
                       net: str = "resnet", context_channels: int = 0, num_classes: int = 0) -> MixtureCoupling2d:
    """A `MixtureCoupling2d` of ``mixtures`` logistics from names, as `affine_coupling2d`."""
    if mixtures < 1:
        raise ValueError(f"mixtures must be >= 1, found {mixtures}")
    masking, conditioner = _mask_and_conditioner(mask, parity, context_channels, num_classes)
    n_in, n_out = masking.sizes(channels)
    network = coupling_net(net, n_in + (conditioner.features if conditioner else 0), (3 * mixtures + 2) * n_out,
                           hidden, blocks)
    return MixtureCoupling2d(masking, network, BoundedScale(n_out), mixtures, conditioner)
