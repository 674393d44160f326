"""Factorised base distributions (priors) over flat latent vectors."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["StandardLogistic", "StandardNormal", "make_prior"]


class _Prior(nn.Module):
    """A factorised density on R^dim. ``log_prob`` is per dimension, shape (B, dim).

    A zero-size buffer carries the device and dtype, so ``.to()`` and ``.double()`` apply.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """Draws ``n`` vectors; ``temperature`` scales them (T < 1 gives more typical samples)."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, found {temperature}")
        return temperature * self._standard_sample(n, generator)

    def _standard_sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def log_prob(self, z: Tensor) -> Tensor:
        raise NotImplementedError


class StandardLogistic(_Prior):
    """``log p(h) = -(softplus(h) + softplus(-h))`` per dimension, as in NICE."""

    def _standard_sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        a = self._anchor
        tiny = torch.finfo(a.dtype).tiny
        u = torch.rand(n, self.dim, generator=generator, device=a.device, dtype=a.dtype).clamp(tiny, 1 - 1e-7)
        return u.log() - (-u).log1p()

    def log_prob(self, z: Tensor) -> Tensor:
        return -(F.softplus(z) + F.softplus(-z))


class StandardNormal(_Prior):
    """The standard Gaussian, per dimension."""

    def _standard_sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        a = self._anchor
        return torch.randn(n, self.dim, generator=generator, device=a.device, dtype=a.dtype)

    def log_prob(self, z: Tensor) -> Tensor:
        return -0.5 * (z**2 + math.log(2 * math.pi))


def make_prior(name: str, dim: int) -> _Prior:
    priors = {"logistic": StandardLogistic, "gaussian": StandardNormal}
    if name not in priors:
        raise ValueError(f"unknown prior {name!r}; expected one of {sorted(priors)}")
    return priors[name](dim)
