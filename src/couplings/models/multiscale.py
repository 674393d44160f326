"""The multi-scale architecture shared by Real NVP and Glow: levels that each factor out half
of the channels, every factored-out latent kept so that the map stays exactly invertible."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from couplings.distributions import StandardNormal
from couplings.models.base import Flow
from couplings.transforms import LearnedSplitPrior, Transform

__all__ = ["MultiScaleFlow", "check_image_shape"]


class MultiScaleFlow(Flow):
    """``preprocess`` -> for each level: its layers, then half the channels factored out
    (standardised by a `LearnedSplitPrior` if given) -> ``final`` layers. The latent ``z`` is
    every factored-out half and the final tensor, flattened and concatenated: (B, C*H*W). Every
    layer is given the context ``y`` (the labels of a class-conditional model; most layers ignore it).

    Subclasses build the layers and pass ``out_shapes``: the shape of each factored-out half and,
    last, of the final tensor.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        preprocess: Transform,
        levels: list[Transform],
        final: Transform,
        out_shapes: list[tuple[int, int, int]],
        split_priors: list[LearnedSplitPrior] | None = None,
    ):
        super().__init__()
        self.event_shape = tuple(image_shape)
        if sum(math.prod(s) for s in out_shapes) != self.dim:
            raise ValueError(f"latent shapes {out_shapes} do not add up to the {self.dim} entries of {image_shape}")
        self.preprocess = preprocess
        self.levels = nn.ModuleList(levels)
        self.final = final
        self.split_priors = nn.ModuleList(split_priors) if split_priors is not None else None
        self.out_shapes = [tuple(s) for s in out_shapes]
        self.prior = StandardNormal(self.dim)

    def _image(self, x: Tensor) -> Tensor:
        return self._flatten(x).reshape(x.shape[0], *self.event_shape)

    def transform(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h, logabsdet = self.preprocess(self._image(x))
        outs = []
        for i, level in enumerate(self.levels):
            h, ld = level(h, y)
            z_out, h = h.chunk(2, dim=1)  # (B, C, H, W) -> factored-out (B, C/2, H, W) and kept half
            if self.split_priors is not None:
                z_out, ld_prior = self.split_priors[i](z_out, h)
                ld = ld + ld_prior
            outs.append(z_out.flatten(1))
            logabsdet = logabsdet + ld
        h, ld = self.final(h, y)
        outs.append(h.flatten(1))
        return torch.cat(outs, dim=1), logabsdet + ld

    def inverse(self, z: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z = self._flatten(z)
        pieces = z.split([math.prod(s) for s in self.out_shapes], dim=1)
        h, logabsdet = self.final.inverse(pieces[-1].reshape(len(z), *self.out_shapes[-1]), y)
        for i in reversed(range(len(self.levels))):
            z_out = pieces[i].reshape(len(z), *self.out_shapes[i])
            if self.split_priors is not None:
                z_out, ld = self.split_priors[i].inverse(z_out, h)
                logabsdet = logabsdet + ld
            h, ld = self.levels[i].inverse(torch.cat([z_out, h], dim=1), y)
            logabsdet = logabsdet + ld
        x, ld = self.preprocess.inverse(h)
        return x, logabsdet + ld


def check_image_shape(image_shape: tuple[int, ...], halvings: int, option: str = "halvings") -> tuple[int, int, int]:
    """(C, H, W) whose sides divide by 2 ``halvings`` times, else a clear error naming the
    config ``option`` that sets ``halvings`` (one squeeze each)."""
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ValueError(f"image_shape must be (C, H, W) with positive sizes, found {image_shape}")
    c, h, w = image_shape
    if h % 2**halvings or w % 2**halvings:
        fits = max(k for k in range(halvings) if h % 2**k == 0 and w % 2**k == 0)  # k = 0 always fits
        fix = f"lower {option} to {fits} or resize the images" if fits else "resize the images to even sides"
        raise ValueError(f"image sides must divide by 2^{halvings} = {2**halvings} for {option}={halvings} "
                         f"(one squeeze each), found {h}x{w}; {fix}")
    return c, h, w

