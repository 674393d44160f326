"""Invertible layers, each following the `Transform` contract of `couplings.transforms.base`.

One file per kind of layer: ``coupling`` (additive and affine couplings), ``mixture`` (the
logistic-mixture coupling), ``coupling_parts`` (the masks, scale functions and conditioners that
image couplings are composed of), ``normalization`` (batch norm as a flow, ActNorm), ``linear``
(diagonal scaling, permutations, 1x1 convolution), ``elementwise`` (logit, shift), ``reshape``
(squeeze) and ``multiscale`` (split priors).
"""

from couplings.transforms.base import Composite, Inverse, Transform
from couplings.transforms.coupling import AdditiveCoupling, AffineCoupling, AffineCoupling2d, affine_coupling2d
from couplings.transforms.coupling_parts import (
    BoundedScale,
    ChannelSplit,
    Checkerboard,
    Context,
    OneHotLabels,
    SigmoidScale,
    TanhScale,
    checkerboard,
)
from couplings.transforms.elementwise import Logit, Shift
from couplings.transforms.linear import DiagonalScaling, InvConv1x1, Permutation
from couplings.transforms.mixture import MixtureCoupling2d, mixture_coupling2d
from couplings.transforms.multiscale import ClassConditionalPrior, LearnedSplitPrior
from couplings.transforms.normalization import ActNorm, BatchNormFlow
from couplings.transforms.reshape import Squeeze

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "AffineCoupling2d",
    "BatchNormFlow",
    "BoundedScale",
    "ChannelSplit",
    "Checkerboard",
    "ClassConditionalPrior",
    "Composite",
    "Context",
    "DiagonalScaling",
    "InvConv1x1",
    "Inverse",
    "LearnedSplitPrior",
    "Logit",
    "MixtureCoupling2d",
    "OneHotLabels",
    "Permutation",
    "Shift",
    "SigmoidScale",
    "Squeeze",
    "TanhScale",
    "Transform",
    "affine_coupling2d",
    "checkerboard",
    "mixture_coupling2d",
]
