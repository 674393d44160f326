"""Flow++'s logistic-mixture CDF coupling on images, composed of the parts of
`couplings.transforms.coupling_parts` like the affine image coupling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from couplings.nn import coupling_net
from couplings.transforms.base import Transform
from couplings.transforms.coupling_parts import BoundedScale, Conditioner, Mask, conditioned, mask_and_conditioner

__all__ = ["MixtureCoupling2d", "mixture_coupling2d"]


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
        h = self.net(conditioned(self.conditioner, x_a, y))
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
    masking, conditioner = mask_and_conditioner(mask, parity, context_channels, num_classes)
    n_in, n_out = masking.sizes(channels)
    network = coupling_net(net, n_in + (conditioner.features if conditioner else 0), (3 * mixtures + 2) * n_out,
                           hidden, blocks)
    return MixtureCoupling2d(masking, network, BoundedScale(n_out), mixtures, conditioner)
