"""The UvA deep-learning course's tutorial 11 flow, rebuilt from couplings' layers as a reference.

`benchmarks/learning_curve.py tutorial` trains it side by side with one of our presets, so that
the comparison is made on the machine at hand: the tutorial's own code was timed on one thread
of a 2-core AMD EPYC (docs/references.md), and another CPU shifts every point of a wall-clock
curve. The design follows the description in docs/references.md;
it is our code, not the tutorial's, so its parameter count is printed with every curve.

- x = (k + u) / 256 with u from a variational dequantizer (4 checkerboard couplings conditioned
  on the image), then logit with alpha = 1e-5;
- 1x28x28: 2 checkerboard couplings (32 channels); squeeze; 4x14x14: 2 channel couplings (48);
  half factored out to a standard normal; squeeze; 8x7x7: 4 channel couplings (64);
- couplings ``(x + t) * exp(c * tanh(h / c))`` with gated convolutional networks of 3 blocks;
- Adam 1e-3, x 0.99 per epoch, batch 128, gradient norm clipped at 1.0.
"""

from __future__ import annotations

from couplings.models.dequantization import VariationalDequantizer
from couplings.models.multiscale import MultiScaleFlow
from couplings.transforms import Composite, Logit, Squeeze, affine_coupling2d

__all__ = ["TUTORIAL_RECIPE", "TutorialFlow"]

# Training options (`--set` keys of a Real NVP run) of the tutorial's recipe.
TUTORIAL_RECIPE = ["batch_size=128", "grad_clip=1.0", "lr_schedule=exponential", "lr_decay=0.99", "wn_l2=0"]


def _couplings(channels: int, mask: str, count: int, hidden: int) -> list:
    return [affine_coupling2d(channels, mask, i % 2, hidden, 3, scale="bounded", net="gated") for i in range(count)]


class TutorialFlow(MultiScaleFlow):
    """The tutorial's multi-scale flow on 1x28x28 images (see the module docstring)."""

    def __init__(self):
        level = Composite([*_couplings(1, "checkerboard", 2, 32), Squeeze(), *_couplings(4, "channel", 2, 48)])
        final = Composite([Squeeze(), *_couplings(8, "channel", 4, 64)])
        super().__init__((1, 28, 28), Logit(1e-5), [level], final, [(2, 14, 14), (8, 7, 7)])
        self.dequantizer = VariationalDequantizer(1, couplings=4, hidden=16, blocks=3)
