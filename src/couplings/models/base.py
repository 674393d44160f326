"""The contract every pixel-space flow model follows."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["Flow"]


def _at_least_float32(t: Tensor) -> Tensor:
    """bf16 or float16 (from autocast) -> float32; float32 and float64 unchanged."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class Flow(nn.Module):
    """A density on dequantized images ``x`` in [0, 1]^D built from an invertible map.

    Subclasses set ``event_shape`` (the shape of one image, e.g. (1, 28, 28)) and ``prior``
    (a factorised density on flat latents), and implement `transform` and `inverse`. Every
    preprocessing step (scaling, logit) belongs inside `transform`, so that its log-det is
    counted and ``log_prob`` is the density of the [0, 1] image itself.
    """

    event_shape: tuple[int, ...]
    prior: nn.Module

    @property
    def dim(self) -> int:
        return math.prod(self.event_shape)

    def transform(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Maps images to flat latents: returns ``z`` of shape (B, D) and ``log |det dz/dx|`` (B,)."""
        raise NotImplementedError

    def inverse(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """Maps flat latents (B, D) back to images of shape (B, *event_shape)."""
        raise NotImplementedError

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Log-density of ``x`` in nats, shape (B,); float32 (or wider) even under bf16 autocast."""
        z, logabsdet = self.transform(x, y)
        return self.prior.log_prob(_at_least_float32(z)).sum(-1) + _at_least_float32(logabsdet)

    @torch.inference_mode()
    def sample(
        self,
        n: int,
        y: Tensor | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draws ``n`` images of shape (n, *event_shape); ``temperature`` scales the prior."""
        return self.inverse(self.prior.sample(n, temperature, generator), y)

    def _flatten(self, x: Tensor) -> Tensor:
        """(B, *event_shape) or (B, D) -> (B, D), with a clear error for anything else."""
        if x.dim() < 2 or math.prod(x.shape[1:]) != self.dim:
            raise ValueError(
                f"{type(self).__name__} expects inputs of shape (B, {', '.join(map(str, self.event_shape))}) "
                f"or (B, {self.dim}), found {tuple(x.shape)}"
            )
        return x.reshape(x.shape[0], self.dim)
