"""Plain neural-network building blocks used inside flow layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GatedConvNet", "ResNet", "ResidualBlock", "WeightNormConv2d", "coupling_net", "mlp"]


def mlp(in_features: int, out_features: int, hidden_layers: int, hidden_units: int) -> nn.Sequential:
    """A ReLU MLP with ``hidden_layers`` hidden layers of ``hidden_units`` units and a linear output."""
    if hidden_layers < 1 or hidden_units < 1:
        raise ValueError(f"an MLP needs >= 1 hidden layer of >= 1 unit, found {hidden_layers} x {hidden_units}")
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(hidden_layers):
        layers += [nn.Linear(width, hidden_units), nn.ReLU()]
        width = hidden_units
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


class _WeightNormParameters(nn.Module):
    """``original0`` (g, the per-output-channel norm) and ``original1`` (v, the direction): the
    names under which ``torch.nn.utils.parametrizations.weight_norm`` keeps them."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.original0 = nn.Parameter(torch.norm_except_dim(weight, 2, 0))
        self.original1 = nn.Parameter(weight)


class WeightNormConv2d(nn.Module):
    """A "same"-padded convolution with weight normalisation, ``w = g * v / ||v||`` per output
    channel (Salimans and Kingma, 2016).

    It is ``torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(...))`` without the
    parametrization machinery: the same initial weights (``nn.Conv2d``'s), the same parameters
    under the same state-dict keys (``bias``, ``parametrizations.weight.original0`` for g,
    ``parametrizations.weight.original1`` for v; checkpoints load either way), and the weight
    from the same ``torch._weight_norm``, computed once per call. The parametrized module pays
    for a Python-level parametrization call on every access of ``weight``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int):
        super().__init__()
        conv = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)  # PyTorch's default init
        self.in_channels, self.out_channels, self.kernel, self.padding = in_channels, out_channels, kernel, kernel // 2
        self.bias = nn.Parameter(conv.bias.detach())
        self.parametrizations = nn.ModuleDict({"weight": _WeightNormParameters(conv.weight.detach())})

    @property
    def weight(self) -> Tensor:
        wn = self.parametrizations["weight"]
        return torch._weight_norm(wn.original1, wn.original0, 0)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, padding=self.padding)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel}, padding={self.padding}, weight_norm=True"


def _wn_conv(in_channels: int, out_channels: int, kernel: int) -> nn.Module:
    return WeightNormConv2d(in_channels, out_channels, kernel)


def _frozen_affine(norm: nn.BatchNorm2d, x: Tensor, *modules: nn.Module) -> tuple[Tensor, Tensor] | None:
    """An eval-mode batch norm as the per-channel affine map of its running statistics,
    ``(alpha, beta)`` with ``alpha = weight / sqrt(var + eps)`` and ``beta = bias - mean * alpha``
    (as PyTorch's CPU kernel computes it), when nothing needs autograd: not ``x``, not the
    parameters of ``norm`` and ``modules``. Else (training mode, gradients) None."""
    if norm.training or not norm.affine or norm.running_mean is None:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for m in (norm, *modules) for p in m.parameters())):
        return None
    alpha = norm.weight * (norm.running_var + norm.eps).sqrt().reciprocal()
    return alpha, norm.bias - norm.running_mean * alpha


def _norm_relu(norm: nn.BatchNorm2d, relu: nn.Module, x: Tensor, owned: bool) -> Tensor:
    """``relu(norm(x))``; ``owned``: nothing else reads ``x`` afterwards.

    In eval mode without autograd (sampling, evaluation) and on an owned ``x``, the batch norm
    is done in place: at a sampling batch that saves a fresh activation-sized tensor per layer,
    memory the allocator would otherwise hand back to the OS and fault in again page by page.
    """
    affine = _frozen_affine(norm, x) if owned else None
    if affine is None:
        return relu(norm(x))
    alpha, beta = affine
    shape = (1, -1, 1, 1)
    return torch.addcmul(beta.view(shape), x, alpha.view(shape), out=x).relu_()


def _conv_norm_relu(conv: WeightNormConv2d, norm: nn.BatchNorm2d, relu: nn.Module, x: Tensor) -> Tensor:
    """``relu(norm(conv(x)))``. In eval mode without autograd the batch norm is folded into the
    convolution (weight times ``alpha`` per output channel, bias ``bias * alpha + beta``): one
    pass over the activations fewer, the same values up to float rounding."""
    affine = _frozen_affine(norm, x, conv)
    if affine is None:
        return _norm_relu(norm, relu, conv(x), owned=True)
    alpha, beta = affine
    weight = conv.weight * alpha.view(-1, 1, 1, 1)
    return F.conv2d(x, weight, torch.addcmul(beta, conv.bias, alpha), padding=conv.padding).relu_()


class ResidualBlock(nn.Module):
    """BN -> ReLU -> 3x3 conv -> BN -> ReLU -> 3x3 conv, added to the input (weight-normed convs).
    The ReLUs, and the addition, work in place on fresh outputs of the layer before."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True), _wn_conv(channels, channels, 3),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True), _wn_conv(channels, channels, 3),
        )

    def forward(self, x):
        norm1, relu1, conv1, norm2, relu2, conv2 = self.body
        h = _norm_relu(norm1, relu1, x, owned=False)  # x is still needed for the sum
        return conv2(_conv_norm_relu(conv1, norm2, relu2, h)).add_(x)  # = x + h, in place on the conv's output


class ResNet(nn.Module):
    """The s/t network of Real NVP's image couplings: a weight-normed ResNet whose last
    convolution starts at zero, so a coupling built on it starts as (nearly) the identity.

    On CPU it computes in the channels-last memory format (same values, faster convolutions).

    References:
        Dinh et al., Real NVP, 2017, section 4.1; Salimans and Kingma, weight normalization, 2016.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int, blocks: int):
        super().__init__()
        if hidden < 1 or blocks < 0:
            raise ValueError(f"a ResNet needs hidden >= 1 channels and blocks >= 0, found {hidden} and {blocks}")
        self.head = _wn_conv(in_channels, hidden, 3)
        self.blocks = nn.Sequential(*[ResidualBlock(hidden) for _ in range(blocks)])
        self.tail = nn.Sequential(nn.BatchNorm2d(hidden), nn.ReLU(inplace=True), nn.Conv2d(hidden, out_channels, 3, padding=1))
        nn.init.zeros_(self.tail[-1].weight)
        nn.init.zeros_(self.tail[-1].bias)

    def _layers(self, x: Tensor) -> Tensor:
        norm, relu, conv = self.tail
        if not self.blocks:  # the tail's batch norm follows the head convolution
            return conv(_conv_norm_relu(self.head, norm, relu, x))
        h = self.blocks(self.head(x))  # a fresh tensor: the last block's output
        return conv(_norm_relu(norm, relu, h, owned=True))

    def forward(self, x):
        return channels_last_on_cpu(self._layers, x)


def channels_last_on_cpu(layers, x: Tensor) -> Tensor:
    """``layers(x)``, computed in the channels-last memory format on CPU (the same values).

    On CPU, oneDNN's 3x3 convolutions (forward and backward) are 1.3-2x faster on channels-last
    tensors than on NCHW ones at these small channel counts; batch norm, ReLU, ELU and a layer norm
    over channels take either (the last without a copy). The input is converted once, the output
    handed back in the usual (contiguous) layout."""
    if x.device.type != "cpu":
        return layers(x)
    return layers(x.contiguous(memory_format=torch.channels_last)).contiguous()


def concat_elu(x: Tensor) -> Tensor:
    """``[elu(x), elu(-x)]`` along channels: (B, C, H, W) -> (B, 2C, H, W); keeps both signs' information.
    One ELU over the concatenated tensor: its backward then runs on one contiguous gradient (two
    ELUs before the concatenation made the eager training step of the fast presets slower, their
    backward running on strided slices of the gradient)."""
    return F.elu(torch.cat([x, -x], dim=1))


class ChannelLayerNorm(nn.Module):
    """Layer normalisation over the channels of each pixel, with a learned per-channel scale and shift."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, C, H, W) -> (B, H, W, C) and back


class GatedBlock(nn.Module):
    """``x + a * sigmoid(b)`` with ``(a, b)`` from concat-ELU -> 3x3 conv -> concat-ELU -> 1x1 conv,
    then layer norm over channels."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv3 = nn.Conv2d(2 * channels, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.norm = ChannelLayerNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.conv1(concat_elu(self.conv3(concat_elu(x)))).chunk(2, dim=1)
        return self.norm(x + a * torch.sigmoid(b))


class GatedConvNet(nn.Module):
    """A coupling network of gated residual blocks: 3x3 conv in, ``blocks`` `GatedBlock` s,
    concat-ELU and a zero-initialised 3x3 conv out (so a coupling built on it starts as the
    identity).

    References:
        Salimans et al., "PixelCNN++", 2017 (concatenated ELU, gated residuals); Ho et al.,
        "Flow++", 2019 (gated convolutional couplings).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int, blocks: int):
        super().__init__()
        if hidden < 1 or blocks < 0:
            raise ValueError(f"a GatedConvNet needs hidden >= 1 channels and blocks >= 0, found {hidden} and {blocks}")
        self.head = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.blocks = nn.Sequential(*[GatedBlock(hidden) for _ in range(blocks)])
        self.tail = nn.Conv2d(2 * hidden, out_channels, 3, padding=1)
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)

    def _layers(self, x: Tensor) -> Tensor:
        return self.tail(concat_elu(self.blocks(self.head(x))))

    def forward(self, x: Tensor) -> Tensor:
        # channels-last on CPU: a Real NVP or Glow `size=fast` training step 15% faster (docs/results.md)
        return channels_last_on_cpu(self._layers, x)


NETS = {"resnet": ResNet, "gated": GatedConvNet}


def coupling_net(kind: str, in_channels: int, out_channels: int, hidden: int, blocks: int) -> nn.Module:
    """The s/t network of an image coupling: "resnet" (Real NVP's `ResNet`) or "gated" (`GatedConvNet`)."""
    if kind not in NETS:
        raise ValueError(f"net must be one of {sorted(NETS)}, found {kind!r}")
    return NETS[kind](in_channels, out_channels, hidden, blocks)
