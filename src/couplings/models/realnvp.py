"""Real NVP with its multi-scale convolutional architecture, on images such as 1x28x28."""

from __future__ import annotations

from dataclasses import dataclass

from couplings.models.base import with_options
from couplings.models.multiscale import MultiScaleFlow, check_image_shape
from couplings.transforms import AffineCoupling2d, BatchNormFlow, Composite, Logit, Squeeze, Transform

__all__ = ["REALNVP_PRESETS", "RealNVP", "RealNVPConfig"]


@dataclass
class RealNVPConfig:
    """The options of `RealNVP`; the defaults are the `mnist` size."""

    image_shape: tuple[int, int, int] = (1, 28, 28)
    scales: int = 2
    hidden: int = 64
    blocks: int = 8
    alpha: float = 0.05
    batch_norm: bool = True

    def __post_init__(self):
        self.image_shape = tuple(self.image_shape)
        if self.scales < 1 or self.hidden < 1 or self.blocks < 0:
            raise ValueError(f"need scales >= 1, hidden >= 1, blocks >= 0; found {self.scales}, {self.hidden}, {self.blocks}")
        check_image_shape(self.image_shape, self.scales)
        if not 0 <= self.alpha < 0.5:
            raise ValueError(f"alpha must be in [0, 0.5), found {self.alpha}")


REALNVP_PRESETS = {"mnist": {}, "small": {"hidden": 16, "blocks": 1}}


class RealNVP(MultiScaleFlow):
    """Real NVP as in the paper: logit preprocessing, then per scale 3 affine couplings with
    alternating checkerboard masks, a squeeze, 3 with alternating channel masks, and half of the
    channels factored out; the last scale has 4 checkerboard couplings. On 1x28x28 with
    ``scales=2``: 28 -> 14 -> 7. Couplings use ``a * tanh`` scales (``a`` starts at 0) and a
    weight-normed ResNet; a batch-norm layer with its log-det follows each coupling.
    Built from a `RealNVPConfig` and/or its fields as keywords.

    References:
        Dinh, Sohl-Dickstein and Bengio, "Density estimation using Real NVP", 2017.
    """

    def __init__(self, config: RealNVPConfig | None = None, /, **options):
        config = with_options(config or RealNVPConfig(), options)
        c, h, w = config.image_shape
        hidden, blocks = config.hidden, config.blocks

        def couplings(channels: int, mask: str, count: int) -> list[Transform]:
            layers: list[Transform] = []
            for i in range(count):
                layers.append(AffineCoupling2d(channels, mask, i % 2, hidden, blocks, scale="tanh"))
                if config.batch_norm:
                    layers.append(BatchNormFlow(channels, spatial=True, momentum=0.05, eps=1e-4))
            return layers

        levels, out_shapes = [], []
        for _ in range(config.scales):
            levels.append(Composite([*couplings(c, "checkerboard", 3), Squeeze(), *couplings(4 * c, "channel", 3)]))
            c, h, w = 4 * c, h // 2, w // 2  # after the squeeze
            out_shapes.append((c // 2, h, w))
            c //= 2  # half factored out
        out_shapes.append((c, h, w))
        super().__init__(config.image_shape, Logit(config.alpha), levels, Composite(couplings(c, "checkerboard", 4)), out_shapes)
        self.config = config
