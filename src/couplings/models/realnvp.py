"""Real NVP with its multi-scale convolutional architecture, on images such as 1x28x28."""

from __future__ import annotations

from dataclasses import dataclass

from couplings.models.base import check_at_least, check_one_of, with_options
from couplings.models.dequantization import VariationalDequantizer
from couplings.models.multiscale import MultiScaleFlow, check_image_shape
from couplings.transforms import (
    BatchNormFlow,
    Composite,
    Logit,
    Squeeze,
    Transform,
    affine_coupling2d,
    mixture_coupling2d,
)

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
    per_scale: int = 3  # couplings of each mask type per scale (the paper: 3 checkerboard, 3 channel)
    final: int = 4  # checkerboard couplings of the last scale
    net: str = "resnet"  # the couplings' networks: "resnet" (the paper) or "gated" (Flow++)
    scale: str = "tanh"  # "tanh": a * tanh(h) (the paper); "bounded": c * tanh(h / c), learned c
    dequantization: str = "uniform"  # or "variational": a learned q(u | k) (Flow++)
    dequant_hidden: int = 16  # channels of the variational dequantizer's gated networks
    coupling: str = "affine"  # or "mixture": Flow++'s logistic-mixture CDF coupling (scale is then unused)
    mixtures: int = 8  # with coupling="mixture": the logistics per mixture (K)

    def __post_init__(self):
        self.image_shape = tuple(self.image_shape)
        if self.scales < 1 or self.hidden < 1 or self.blocks < 0:
            raise ValueError(f"need scales >= 1, hidden >= 1, blocks >= 0; found {self.scales}, {self.hidden}, {self.blocks}")
        check_at_least(self, 1, "per_scale", "final", "dequant_hidden", "mixtures")
        check_image_shape(self.image_shape, self.scales, "scales")
        if not 0 <= self.alpha < 0.5:
            raise ValueError(f"alpha must be in [0, 0.5), found {self.alpha}")
        check_one_of(self, net=("resnet", "gated"), scale=("tanh", "bounded"), dequantization=("uniform", "variational"),
                     coupling=("affine", "mixture"))


# "fast": the best validation bits/dim after minutes of training on one CPU thread that we
# measured (benchmarks/learning_curve.py, results/curves/); grad_clip and precision are training
# options (precision=auto: bf16 where a short probe finds it faster, results/curves/bf16/).
REALNVP_PRESETS = {
    "mnist": {},
    "small": {"hidden": 16, "blocks": 1},
    "fast": {"hidden": 32, "blocks": 1, "alpha": 1e-5, "net": "gated", "scale": "bounded", "batch_norm": False,
             "per_scale": 2, "dequantization": "variational", "grad_clip": 500.0, "precision": "auto"},
}


class RealNVP(MultiScaleFlow):
    """Real NVP as in the paper: logit preprocessing, then per scale 3 affine couplings with
    alternating checkerboard masks, a squeeze, 3 with alternating channel masks, and half of the
    channels factored out; the last scale has 4 checkerboard couplings. On 1x28x28 with
    ``scales=2``: 28 -> 14 -> 7. Couplings use ``a * tanh`` scales (``a`` starts at 0) and a
    weight-normed ResNet; a batch-norm layer with its log-det follows each coupling.
    Built from a `RealNVPConfig` and/or its fields as keywords.

    Beyond the paper, as options: the number of couplings per scale (``per_scale``, ``final``),
    gated convolutional networks (``net="gated"``), scales that can expand as well as contract
    (``scale="bounded"``), variational dequantization (``dequantization="variational"``) and
    logistic-mixture CDF couplings (``coupling="mixture"``, `MixtureCoupling2d`, with ``mixtures``
    logistics each), the ingredients of Flow++ and of fast-learning small flows.

    Examples:
        A narrow Real NVP (8 channels, one residual block per network) on MNIST-shaped images:

        >>> import torch
        >>> from couplings import RealNVP
        >>> model = RealNVP(hidden=8, blocks=1).eval()
        >>> x = torch.rand(3, 1, 28, 28)
        >>> model.log_prob(x).shape
        torch.Size([3])
        >>> z, logabsdet = model.transform(x)
        >>> z.shape
        torch.Size([3, 784])
        >>> torch.allclose(model.inverse(z)[0], x, atol=1e-4)
        True
        >>> model.sample(2).shape
        torch.Size([2, 1, 28, 28])

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
                if config.coupling == "mixture":
                    layers.append(mixture_coupling2d(channels, mask, i % 2, hidden, blocks, config.mixtures,
                                                    net=config.net))
                else:
                    layers.append(affine_coupling2d(channels, mask, i % 2, hidden, blocks, scale=config.scale,
                                                   net=config.net))
                if config.batch_norm:
                    layers.append(BatchNormFlow(channels, spatial=True, momentum=0.05, eps=1e-4))
            return layers

        levels, out_shapes = [], []
        for _ in range(config.scales):
            levels.append(Composite([*couplings(c, "checkerboard", config.per_scale), Squeeze(),
                                     *couplings(4 * c, "channel", config.per_scale)]))
            c, h, w = 4 * c, h // 2, w // 2  # after the squeeze
            out_shapes.append((c // 2, h, w))
            c //= 2  # half factored out
        out_shapes.append((c, h, w))
        super().__init__(config.image_shape, Logit(config.alpha), levels,
                         Composite(couplings(c, "checkerboard", config.final)), out_shapes)
        self.config = config
        if config.dequantization == "variational":
            self.dequantizer = VariationalDequantizer(config.image_shape[0], hidden=config.dequant_hidden)
