"""NICE: additive couplings, a diagonal scaling and a logistic prior."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from couplings.distributions import make_prior
from couplings.models.base import Flow, check_at_least, with_options
from couplings.transforms import AdditiveCoupling, Composite, DiagonalScaling

__all__ = ["NICE", "NICEConfig"]


@dataclass
class NICEConfig:
    """The options of `NICE`; the defaults are the paper's MNIST model."""

    dim: int = 784
    couplings: int = 4
    hidden_layers: int = 5
    hidden_units: int = 1000
    prior: str = "logistic"
    scale_init: str = "zero"  # "zero" (the paper) or "data": the first batch sets the scaling to the prior's spread
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) of dim pixels; None: (1, 28, 28) for dim 784, else flat

    def __post_init__(self):
        check_at_least(self, 1, "dim", "couplings", "hidden_layers", "hidden_units")
        if self.dim < 2:
            raise ValueError(f"dim must be >= 2 (a coupling splits it in two), found {self.dim}")
        if self.image_shape is not None:
            self.image_shape = tuple(self.image_shape)
            if len(self.image_shape) != 3 or min(self.image_shape) < 1 or math.prod(self.image_shape) != self.dim:
                raise ValueError(f"image_shape must be (C, H, W) with C * H * W = dim = {self.dim}, found {self.image_shape}")
        if self.prior not in ("logistic", "gaussian"):
            raise ValueError(f"prior must be 'logistic' or 'gaussian', found {self.prior!r}")
        if self.scale_init not in ("zero", "data"):
            raise ValueError(f"scale_init must be 'zero' or 'data', found {self.scale_init!r}")


NICE_PRESETS = {
    "paper": {},
    "small": {"hidden_layers": 4, "hidden_units": 256},
}


class NICE(Flow):
    """NICE as in the paper: ``couplings`` additive coupling layers on an odd/even split,
    the halves swapped after each layer, ReLU MLPs, then ``z = exp(s) * h`` with ``s``
    initialised at 0, under a standard logistic (or Gaussian) prior.

    Built from a `NICEConfig` and/or its fields as keywords: ``NICE()``, ``NICE(hidden_units=64)``
    or ``NICE(config)``. With the defaults the model has exactly 19,158,352 parameters. Inputs
    may be images (B, *event_shape) or flat vectors (B, dim); samples have shape
    (n, *event_shape), which is ``image_shape`` if set, else (1, 28, 28) for dim = 784 and (dim,).

    Examples:
        A small NICE on MNIST-shaped images: log-densities in nats, exact inverses, samples.

        >>> import torch
        >>> from couplings import NICE
        >>> model = NICE(couplings=2, hidden_layers=1, hidden_units=16)
        >>> x = torch.rand(3, 1, 28, 28)
        >>> model.log_prob(x).shape
        torch.Size([3])
        >>> z, logabsdet = model.transform(x)
        >>> z.shape, logabsdet.shape
        (torch.Size([3, 784]), torch.Size([3]))
        >>> torch.allclose(model.inverse(z)[0], x, atol=1e-5)
        True
        >>> model.sample(2).shape
        torch.Size([2, 1, 28, 28])

    References:
        Dinh, Krueger and Bengio, "NICE: Non-linear Independent Components Estimation", 2014.
    """

    def __init__(self, config: NICEConfig | None = None, /, **options):
        super().__init__()
        self.config = config = with_options(config or NICEConfig(), options)
        dim = config.dim
        self.event_shape = config.image_shape or ((1, 28, 28) if dim == 28 * 28 else (dim,))
        layers = [AdditiveCoupling(dim, i % 2, config.hidden_layers, config.hidden_units) for i in range(config.couplings)]
        prior_std = math.pi / math.sqrt(3) if config.prior == "logistic" else 1.0
        self.flow = Composite([*layers, DiagonalScaling(dim, config.scale_init, prior_std)])
        self.prior = make_prior(config.prior, dim)

    def transform(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.flow(self._flatten(x))

    def inverse(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x, logabsdet = self.flow.inverse(self._flatten(z))
        return x.reshape(z.shape[0], *self.event_shape), logabsdet
