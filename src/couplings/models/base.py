"""The contract every model follows: a density built from an invertible map and a prior."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

__all__ = ["Flow", "check_at_least", "check_one_of", "with_options"]

C = TypeVar("C")


def with_options(config: C, options: dict[str, Any]) -> C:
    """A copy of dataclass ``config`` with ``options`` replaced (and validated by its ``__post_init__``)."""
    return dataclasses.replace(config, **options)


def check_at_least(config: Any, low: int, *names: str) -> None:
    """A config's ``__post_init__`` check: each named field is an integer >= ``low``."""
    for name in names:
        if getattr(config, name) < low:
            raise ValueError(f"{name} must be >= {low}, found {getattr(config, name)}")


def check_one_of(config: Any, **allowed: tuple[str, ...]) -> None:
    """A config's ``__post_init__`` check: each named field holds one of its allowed values."""
    for name, values in allowed.items():
        if getattr(config, name) not in values:
            raise ValueError(f"{name} must be one of {', '.join(values)}; found {getattr(config, name)!r}")


def at_least_float32(t: Tensor) -> Tensor:
    """bf16 or float16 (from autocast) -> float32; float32 and float64 unchanged."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class Flow(nn.Module):
    """A density built from an invertible map ``transform`` and a factorised ``prior``.

    Every model MUST follow the layer contract of `couplings.transforms.Transform`, under the
    names ``transform`` (data to flat latents) and ``inverse`` (back), and set:

    * ``config``: its config dataclass (stored in checkpoints; the model rebuilds from it alone);
    * ``event_shape``: the shape of one image, e.g. (1, 28, 28);
    * ``prior``: a factorised density on flat latents (B, D) (`couplings.distributions`).

    Two class-level facts tell callers what a model is, so nobody has to probe for attributes:

    * ``has_pixel_density``: ``log_prob`` is a density on [0, 1] pixels (so bits/dim apply). Every
      preprocessing step (scaling, logit) then belongs inside ``transform``, so that its log-det
      is counted. False for `LatentRealNVP`, whose density lives on an embedding.
    * ``conditional``: ``transform``, ``inverse`` and ``sample`` take class labels ``y`` (B,),
      ``num_classes`` of them.

    ``dequantizer`` is None for uniform dequantization, or a learned q(u | k) whose log-density
    `pixel_log_prob` subtracts.
    """

    has_pixel_density: ClassVar[bool] = True
    conditional: bool = False
    num_classes: int = 0
    dequantizer: nn.Module | None  # q(u | k) (`VariationalDequantizer`); None: uniform noise
    config: Any
    event_shape: tuple[int, ...]
    prior: nn.Module

    def __init__(self):
        super().__init__()
        self.dequantizer = None  # an instance attribute: a module assigned later registers as a submodule

    @property
    def dim(self) -> int:
        return math.prod(self.event_shape)

    def transform(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Maps images to flat latents: returns ``z`` (B, D) and ``log |det dz/dx|`` (B,)."""
        raise NotImplementedError

    def inverse(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Maps flat latents (B, D) back: returns images (B, *event_shape) and ``log |det dx/dz|`` (B,)."""
        raise NotImplementedError

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Log-density of ``x`` in nats, shape (B,); float32 (or wider) even under bf16 autocast."""
        z, logabsdet = self.transform(x, y)
        return self.prior.log_prob(at_least_float32(z)).sum(-1) + at_least_float32(logabsdet)

    def pixel_log_prob(self, pixels: Tensor, noise: Tensor, y: Tensor | None = None) -> Tensor:
        """``log p(x) - log q(u | k)`` (nats, (B,)) at ``x = (k + u) / 256`` for 8-bit ``pixels`` k.

        ``noise`` (uniform on [0, 1), the shape of ``pixels``) is u itself for uniform
        dequantization (q = 1), or the base noise of the model's `dequantizer`. Its mean over
        images is the dequantization bound that training maximises and that bits/dim reports
        (`couplings.likelihood`).
        """
        return self.pixel_log_prob_and_latent(pixels, noise, y)[0]

    def pixel_log_prob_and_latent(self, pixels: Tensor, noise: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """`pixel_log_prob` and the latent ``z`` (B, D) of the dequantized images, for a training
        loss on the latent (`class_loss`) at no second pass."""
        x, log_q = self.dequantize(pixels, noise)
        z, logabsdet = self.transform(x, y)
        log_p = self.prior.log_prob(at_least_float32(z)).sum(-1) + at_least_float32(logabsdet)
        return (log_p if log_q is None else log_p - at_least_float32(log_q)), z

    def dequantize(self, pixels: Tensor, noise: Tensor) -> tuple[Tensor, Tensor | None]:
        """Continuous images ``x = (k + u) / 256`` for 8-bit ``pixels`` k and ``log q(u | k)`` (B,),
        None for uniform dequantization (``noise`` as in `pixel_log_prob`)."""
        k = pixels.to(noise.dtype)
        u, log_q = (noise, None) if self.dequantizer is None else self.dequantizer(noise, k)
        return (k + u) / 256, log_q

    def class_log_likelihoods(self, x: Tensor) -> Tensor:
        """``log p(x | c)`` (nats, (B, num_classes)) of images ``x`` under every class ``c`` of a
        class-conditional model: with a uniform class prior, its softmax over classes is the
        model's own (Bayes) classifier p(c | x). One pass per class."""
        if not self.conditional:
            raise ValueError(f"class_log_likelihoods needs a class-conditional model; this {type(self).__name__} is not")
        classes = torch.arange(self.num_classes, device=x.device)
        log_p = self.log_prob(x.repeat_interleave(self.num_classes, dim=0), classes.repeat(len(x)))
        return log_p.view(len(x), self.num_classes)

    def class_loss(self, z: Tensor, y: Tensor) -> Tensor | None:
        """An auxiliary training loss on the latents ``z`` of images labelled ``y`` (mean over the
        batch), weighted into the training objective but never into bits/dim; None for models
        without one (`Glow`'s ``class_loss_weight``)."""
        return None

    @torch.inference_mode()
    def sample_with_log_prob(
        self, n: int, y: Tensor | None = None, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``n`` samples (n, *event_shape) and the model's log-density of each, in nats.

        ``temperature`` scales the prior's draws; the log-density is of the sample itself (at
        T = 1 it is the density the sample was drawn from)."""
        z = self.prior.sample(n, temperature, generator)
        x, logabsdet = self.inverse(z, y)
        return x, self.prior.log_prob(z).sum(-1) - logabsdet

    @torch.inference_mode()
    def sample(
        self,
        n: int,
        y: Tensor | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draws ``n`` images of shape (n, *event_shape); ``temperature`` scales the prior."""
        return self.inverse(self.prior.sample(n, temperature, generator), y)[0]

    def _flatten(self, x: Tensor) -> Tensor:
        """(B, *event_shape) or (B, D) -> (B, D), with a clear error for anything else."""
        if x.dim() < 2 or math.prod(x.shape[1:]) != self.dim:
            raise ValueError(
                f"{type(self).__name__} expects inputs of shape (B, {', '.join(map(str, self.event_shape))}) "
                f"or (B, {self.dim}), found {tuple(x.shape)}"
            )
        return x.reshape(x.shape[0], self.dim)
