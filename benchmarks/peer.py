"""Training and sampling throughput of couplings against normflows on matched architectures.

Side by side, in one process: `couplings` and the PyPI package `normflows` (a benchmark-only
dependency) build the same architecture; one JSON object on stdout.

    python benchmarks/peer.py                                  # nice, realnvp, glow; train and sample
    python benchmarks/peer.py --arch glow --mode train --steps 20 --threads 2

For each architecture both models are built (seed 0), each gets its own Adam (lr 1e-3), and
both train on the same dequantized random batch (uint8 pixels k -> (k + u) / 256) with the
loss -log_prob(x).mean(). After 2 warm-up steps each (which also run the data-dependent ActNorm
initialisations), timed steps alternate couplings, normflows, couplings, ... so that both share
any CPU noise; a step is forward + backward + optimizer step. Sampling is timed the same way:
drawing ``--sample-batch`` images under no_grad, in eval mode. ``ratio`` is couplings/normflows.

How the architectures are matched (same depth, width, input shape, batch and optimizer):

* nice: `couplings.models.NICE` at the preset (small: 4 couplings, MLPs of 4 x 256) against
  normflows additive couplings, ``AffineCouplingBlock(MLP(...), scale=False)`` on the same
  odd/even split (normflows' "checkerboard" split of a flat vector), the same MLP sizes and
  NICE's diagonal scaling (``AffineConstFlow(scale=True, shift=False)``): equal parameter counts.
  Difference: normflows has no logistic base, so both use a standard Gaussian (NICE's own
  option, prior="gaussian"). normflows' checkerboard split rebuilds its mask in Python and
  gathers with ``nonzero`` on every call; that is its implementation, and part of what is timed.
* realnvp: couplings' multi-scale Real NVP cannot be rebuilt faithfully in normflows: its
  checkerboard split packs half the pixels into a (C, H, W/2) tensor (other convolutions than
  a masked image) and fails on the odd 7x7 last scale, and it has no invertible batch norm
  with running averages (needed to sample). So BOTH libraries get the same simpler stack, from
  their own layers: logit preprocessing (alpha 0.05), a squeeze 1x28x28 -> 4x14x14, then
  ``REALNVP_COUPLINGS`` affine couplings with alternating channel masks, under a standard
  Gaussian. The s/t nets have the same layers on both sides (`_normflows_resnet`): couplings'
  ``ResNet`` at the preset's width and residual blocks (small: 16 channels, 1 block), i.e. a
  weight-normed 3x3 head convolution, residual blocks of BN, ReLU, weight-normed 3x3 conv, BN,
  ReLU, weight-normed 3x3 conv, and a tail of BN, ReLU, plain 3x3 conv; on the normflows side
  its ``ConvResidualNet`` and its residual blocks (the same BN/ReLU/3x3 layers), with the 1x1
  head and tail it would otherwise have replaced by that 3x3 head and BN-ReLU-3x3 tail, and
  PyTorch's ``weight_norm`` (normflows has none of its own) on the same convolutions. Last
  layer zeroed in both. Scales: ``a * tanh(h)`` in couplings, ``exp(h)`` in normflows (no tanh
  option there).
* glow: `couplings.models.Glow` at the preset (small: 2 levels of 6 steps, 64 channels,
  0 residual blocks) against a normflows ``MultiscaleFlow`` of the same levels: per level a
  squeeze (28 -> 14 -> 7), then steps of ActNorm, LU 1x1 convolution and a channel-split
  affine coupling with Glow's sigmoid scale, and half the channels factored out. The steps are
  built from normflows' parts rather than ``nf.flows.GlowBlock``, whose coupling net is fixed
  at 3 convolutions (3x3, 1x1, 3x3) and would have twice the parameters of couplings' 2
  (3x3, 3x3 with 0 blocks); the coupling net is the same ``_normflows_resnet`` as for realnvp,
  layer for layer couplings' ResNet (small: weight-normed 3x3 conv, BN, ReLU, 3x3 conv).
  Difference: couplings standardises factored-out halves with a learned conditional prior (a
  3x3 conv of the kept half) while normflows uses its per-channel ``GlowBase``.

``--size fast`` takes the depth and widths of the fast presets (Real NVP: 32 channels, 1 residual
block; Glow: 2 levels of 6 steps, 32 channels, 1 block) and builds them as above: normflows has
no gated networks, bounded scales or variational dequantization, so those options of the presets
are left out on both sides (`MATCHED_OPTIONS`); the timed step is that of the same couplings and
widths with the paper's ResNets.

The parameter counts differ by exactly what is left: Real NVP's tanh factors (one per masked-out
channel, couplings only), and couplings' prior convolutions against ``GlowBase``'s per-channel
parameters. ``normflows_weight_norm=False`` (``--no-normflows-weight-norm``) leaves the normflows
convolutions plain instead: less work on that side than on couplings'.

Sampling in normflows also returns the log-density of the samples (its API always computes
it); couplings' ``sample`` returns the images only.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from couplings.likelihood import dequantize
from couplings.hardware import describe, resolve_device
from couplings.transforms import Logit, Squeeze, affine_coupling2d
from couplings.models import NICE, Glow, MultiScaleFlow
from couplings.models.glow import GLOW_PRESETS
from couplings.models.nice import NICE_PRESETS
from couplings.models.realnvp import REALNVP_PRESETS, RealNVPConfig
from couplings.training.optim import ADAM_KERNELS
from couplings.transforms import Composite

ARCHS = ("nice", "realnvp", "glow")
IMAGE_SHAPE = (1, 28, 28)
REALNVP_COUPLINGS = 8  # the depth of the Real NVP stack, in both libraries
WARMUP_STEPS = 2
CPU = torch.device("cpu")


def import_normflows():
    try:
        import normflows
    except ImportError as error:
        raise ImportError("this benchmark needs normflows; pip install normflows: a benchmark-only dependency") from error
    return normflows


@dataclass
class Contender:
    """One library's model, with its log-density of images (B, 1, 28, 28) -> (B,) and its sampler."""

    model: nn.Module
    log_prob: Callable[[Tensor], Tensor]
    sample: Callable[[int], Tensor]

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


# The preset options both libraries can build. The rest (the fast presets' gated networks, bounded
# scales, variational dequantization and logit input for Glow, and training options) have no
# normflows counterpart: the benchmark keeps the paper's choice for those on both sides.
MATCHED_OPTIONS = {"realnvp": ("hidden", "blocks", "alpha"), "glow": ("levels", "steps", "hidden", "blocks", "min_scale")}


def _preset(presets: dict, size: str, arch: str) -> dict:
    """``size`` from a model's presets, narrowed to `MATCHED_OPTIONS`; "full" (or "paper"/"mnist")
    means its first, full-size one."""
    if size in ("full", "paper", "mnist"):
        size = next(iter(presets))
    if size not in presets:
        raise ValueError(f"{arch} has no size {size!r}; expected one of {sorted(presets)} or 'full'")
    matched = MATCHED_OPTIONS.get(arch)
    return {key: value for key, value in presets[size].items() if matched is None or key in matched}


def _couplings_contender(model) -> Contender:
    return Contender(model, model.log_prob, model.sample)


def _normflows_contender(model, log_prob: Callable[[Tensor], Tensor]) -> Contender:
    return Contender(model, log_prob, lambda n: model.sample(n)[0])  # normflows samples (x, log_q)


def build_nice(nf, size: str, hidden: int | None, weight_norm: bool = True) -> tuple[Contender, Contender]:
    """``weight_norm`` is unused: NICE's MLPs have none."""
    config = _preset(NICE_PRESETS, size, "nice")
    config["prior"] = "gaussian"  # normflows has no logistic base distribution
    if hidden is not None:
        config["hidden_units"] = hidden
    ours = NICE(**config)
    dim, cfg = ours.dim, ours.config
    half = dim // 2  # 784 is even: both halves have dim / 2 entries
    sizes = [half, *[cfg.hidden_units] * cfg.hidden_layers, half]
    # couplings' parity p conditions on the entries p, p + 2, ...; normflows' "checkerboard" split of a
    # flat vector conditions on the odd entries, "checkerboard_inv" on the even ones.
    modes = ["checkerboard_inv" if i % 2 == 0 else "checkerboard" for i in range(cfg.couplings)]
    data_to_noise = [nf.flows.AffineCouplingBlock(nf.nets.MLP(sizes), scale=False, split_mode=mode) for mode in modes]
    scaling = nf.flows.AffineConstFlow((dim,), scale=True, shift=False)  # NICE's diagonal scaling
    # normflows lists flows from noise to data and runs them backwards (with .inverse) in log_prob.
    theirs = nf.NormalizingFlow(nf.distributions.DiagGaussian(dim, trainable=False), [scaling, *reversed(data_to_noise)])
    return _couplings_contender(ours), _normflows_contender(theirs, lambda x: theirs.log_prob(x.flatten(1)))


def _normflows_resnet(nf, in_channels: int, out_channels: int, hidden: int, blocks: int,
                      weight_norm: bool = True) -> nn.Module:
    """normflows' ``ConvResidualNet`` with the layers of couplings' ``ResNet``: a 3x3 head, ``blocks``
    residual blocks (BN, ReLU, 3x3 conv, BN, ReLU, 3x3 conv: normflows' own), then BN, ReLU and a
    zeroed 3x3 tail, where ``ConvResidualNet`` would have a 1x1 head and a bare 1x1 tail. With
    ``weight_norm``, PyTorch's weight norm on the convolutions that couplings weight-norms (all
    but the tail)."""
    net = nf.nets.ConvResidualNet(in_channels, out_channels, hidden, num_blocks=blocks, use_batch_norm=True)
    net.initial_layer = nn.Conv2d(in_channels, hidden, 3, padding=1)
    tail = nn.Conv2d(hidden, out_channels, 3, padding=1)
    nn.init.zeros_(tail.weight)
    nn.init.zeros_(tail.bias)
    net.final_layer = nn.Sequential(nn.BatchNorm2d(hidden), nn.ReLU(), tail)
    if weight_norm:
        for conv in [net.initial_layer, *(c for block in net.blocks for c in block.conv_layers)]:
            nn.utils.parametrizations.weight_norm(conv)
    return net


def build_realnvp(nf, size: str, hidden: int | None, weight_norm: bool = True) -> tuple[Contender, Contender]:
    config = RealNVPConfig(**_preset(REALNVP_PRESETS, size, "realnvp"))
    width, blocks, alpha = config.hidden if hidden is None else hidden, config.blocks, config.alpha
    c, h, w = 4 * IMAGE_SHAPE[0], IMAGE_SHAPE[1] // 2, IMAGE_SHAPE[2] // 2  # after the squeeze
    layers = [affine_coupling2d(c, "channel", i % 2, width, blocks, scale="tanh") for i in range(REALNVP_COUPLINGS)]
    ours = MultiScaleFlow(IMAGE_SHAPE, Logit(alpha), [], Composite([Squeeze(), *layers]), [(c, h, w)])

    def coupling(i: int):
        net = _normflows_resnet(nf, c // 2, c, width, blocks, weight_norm)
        return nf.flows.AffineCouplingBlock(net, scale=True, scale_map="exp", split_mode="channel_inv" if i % 2 else "channel")

    data_to_noise = [coupling(i) for i in range(REALNVP_COUPLINGS)]
    flows = [*reversed(data_to_noise), nf.flows.Squeeze(), nf.transforms.Logit(alpha)]
    theirs = nf.NormalizingFlow(nf.distributions.DiagGaussian((c, h, w), trainable=False), flows)
    return _couplings_contender(ours), _normflows_contender(theirs, theirs.log_prob)


def build_glow(nf, size: str, hidden: int | None, weight_norm: bool = True) -> tuple[Contender, Contender]:
    config = _preset(GLOW_PRESETS, size, "glow")
    if hidden is not None:
        config["hidden"] = hidden
    ours = Glow(image_shape=IMAGE_SHAPE, **config)
    cfg = ours.config

    def step(channels: int) -> list:
        """Noise-to-data order: coupling, 1x1 conv, ActNorm (data to noise: ActNorm first, as in couplings)."""
        net = _normflows_resnet(nf, channels // 2, channels, cfg.hidden, cfg.blocks, weight_norm)
        coupling = nf.flows.AffineCouplingBlock(net, scale=True, scale_map="sigmoid", split_mode="channel")
        return [coupling, nf.flows.Invertible1x1Conv(channels, use_lu=True), nf.flows.ActNorm((channels, 1, 1))]

    c, h, w = IMAGE_SHAPE
    flows, bases = [], []  # per level, from the first (finest) to the last
    for level in range(cfg.levels):
        c, h, w = 4 * c, h // 2, w // 2  # after the squeeze
        flows.append([layer for _ in range(cfg.steps) for layer in step(c)] + [nf.flows.Squeeze()])
        if level < cfg.levels - 1:
            c //= 2  # half factored out
        bases.append(nf.distributions.GlowBase((c, h, w)))  # the factored-out half, or the last tensor
    class Shift(nf.flows.Flow):
        """Glow's centring of pixels at 0, out of place (nf.transforms.Shift would change the shared batch)."""

        def forward(self, z):  # noise to data
            return z + 0.5, z.new_zeros(len(z))

        def inverse(self, x):  # data to noise
            return x - 0.5, x.new_zeros(len(x))

    # normflows orders levels from the coarsest (noise side) to the finest.
    merges = [nf.flows.Merge() for _ in range(cfg.levels - 1)]
    theirs = nf.MultiscaleFlow(bases[::-1], flows[::-1], merges, transform=Shift(), class_cond=False)
    return _couplings_contender(ours), _normflows_contender(theirs, lambda x: theirs.log_prob(x, None))


BUILDERS = {"nice": build_nice, "realnvp": build_realnvp, "glow": build_glow}


def build(arch: str, size: str = "small", hidden: int | None = None,
          device: torch.device = CPU, normflows_weight_norm: bool = True) -> dict[str, Contender]:
    """The two models of ``arch``, seeded, on ``device``: {"couplings": ..., "normflows": ...}.
    ``normflows_weight_norm``: weight-norm the normflows s/t convolutions that couplings does."""
    nf = import_normflows()
    torch.manual_seed(0)
    with warnings.catch_warnings():  # normflows' Invertible1x1Conv still calls the deprecated torch.lu
        warnings.filterwarnings("ignore", message="torch.lu is deprecated")
        ours, theirs = BUILDERS[arch](nf, size, hidden, normflows_weight_norm)
    ours.model.to(device)
    theirs.model.to(device)
    return {"couplings": ours, "normflows": theirs}


def _alternate(fns: list[Callable[[], object]], repeats: int, device: torch.device) -> list[float]:
    """Runs fns[0], fns[1], fns[0], ... ``repeats`` rounds; the seconds spent in each."""
    seconds = [0.0] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[i] += time.perf_counter() - start
    return seconds


def _significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def run(arch: str, modes: tuple[str, ...] = ("train", "sample"), steps: int = 10, batch_size: int = 64,
        sample_batch: int = 256, size: str = "small", hidden: int | None = None,
        device: torch.device = CPU, normflows_weight_norm: bool = True, couplings_adam: str = "default") -> list[dict]:
    """Times both libraries on ``arch``: one result row per mode. ``couplings_adam`` ("foreach",
    "fused") gives couplings' side that Adam implementation (a couplings fast path, `--set
    adam=...`); normflows always gets PyTorch's default Adam."""
    contenders = build(arch, size, hidden, device, normflows_weight_norm)
    pixels = torch.randint(0, 256, (batch_size, *IMAGE_SHAPE), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1)).to(device)
    x = dequantize(pixels, generator=torch.Generator(device=device).manual_seed(2))

    def train_step(contender: Contender, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
        def step():
            loss = -contender.log_prob(x).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    def sample_step(contender: Contender) -> Callable[[], None]:
        def step():
            with torch.no_grad():
                contender.sample(sample_batch)
        return step

    names = list(contenders)
    for c in contenders.values():
        c.model.train()
    impl = ADAM_KERNELS[couplings_adam]
    train = [train_step(c, torch.optim.Adam(c.model.parameters(), lr=1e-3, **(impl if name == "couplings" else {})))
             for name, c in contenders.items()]
    _alternate(train, WARMUP_STEPS, device)  # also initialises ActNorm, in every mode
    rows = []
    for mode in modes:
        if mode == "train":
            seconds, images = _alternate(train, steps, device), steps * batch_size
        else:
            for c in contenders.values():
                c.model.eval()
            fns = [sample_step(c) for c in contenders.values()]
            _alternate(fns, 1, device)  # warm-up
            seconds, images = _alternate(fns, steps, device), steps * sample_batch
        speed = {name: images / s for name, s in zip(names, seconds)}
        rows.append({
            "arch": arch, "mode": mode, "images": images,
            "couplings_images_per_s": _significant(speed["couplings"]),
            "normflows_images_per_s": _significant(speed["normflows"]),
            "ratio": _significant(speed["couplings"] / speed["normflows"]),
            "couplings_parameters": contenders["couplings"].parameters,
            "normflows_parameters": contenders["normflows"].parameters,
        })
    return rows


def benchmark(archs=ARCHS, mode: str = "both", steps: int = 10, batch_size: int = 64, sample_batch: int = 256,
              size: str = "small", hidden: int | None = None, device: str = "cpu", threads: int | None = None,
              normflows_weight_norm: bool = True, couplings_adam: str = "default") -> dict:
    """The whole report: hardware, versions, settings and one row per (arch, mode)."""
    nf = import_normflows()
    if threads is not None:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    modes = ("train", "sample") if mode == "both" else (mode,)
    results = [row for arch in archs
               for row in run(arch, modes, steps, batch_size, sample_batch, size, hidden, dev, normflows_weight_norm,
                              couplings_adam)]
    return {"hardware": describe(dev), "torch": torch.__version__, "normflows": nf.__version__,
            "device": dev.type, "threads": torch.get_num_threads(), "size": size, "hidden": hidden,
            "steps": steps, "batch_size": batch_size, "sample_batch": sample_batch,
            "normflows_weight_norm": normflows_weight_norm, "couplings_adam": couplings_adam, "results": results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument("--mode", choices=["train", "sample", "both"], default="both")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (or draws) per library")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sample-batch", type=int, default=256)
    parser.add_argument("--size", default="small", help="couplings preset: small, fast, or full (the paper/mnist size)")
    parser.add_argument("--hidden", type=int, help="override the preset's width (NICE units, Real NVP/Glow channels)")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--no-normflows-weight-norm", dest="normflows_weight_norm", action="store_false",
                        help="plain normflows s/t convolutions (less work than couplings' weight-normed ones)")
    parser.add_argument("--couplings-adam", choices=["default", "foreach", "fused"], default="default",
                        help="couplings' Adam implementation (normflows keeps PyTorch's default)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 2 or args.sample_batch < 1:
        parser.error("need --steps >= 1, --batch-size >= 2 (batch norm) and --sample-batch >= 1")
    report = benchmark(args.arch, args.mode, args.steps, args.batch_size, args.sample_batch, args.size,
                       args.hidden, args.device, args.threads, args.normflows_weight_norm, args.couplings_adam)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
