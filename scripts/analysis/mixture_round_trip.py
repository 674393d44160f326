"""Where a trained flow's float32 round trip fails: per-image errors, and float64 against float32.

    OMP_NUM_THREADS=1 python scripts/analysis/mixture_round_trip.py results/long-glow-mix-fast/last.pt

Prints how many test images miss ``max |inverse(transform(x)) - x| < 1e-4`` in float32 (uniform
dequantization, seed 0, as `couplings eval` checks it), the worst eight and their float64 round
trip, then, on the first 1,000 images, the float32 forward with a float64 inverse and the float64
forward (rounded to float32) with a float32 inverse: if both fail too, the map itself is
ill-conditioned (a float32 rounding of z moves x by more than 1e-4), not the inverse's search.
Last, each mixture coupling alone on the inputs it sees for the worst eight: which layers miss.
"""
from __future__ import annotations

import copy
import sys

import torch

from couplings import checkpoint, data
from couplings.likelihood import dequantize


def round_trip(model, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-image max |inverse(z) - x|."""
    return (model.inverse(z.to(model.prior.dtype))[0].double() - x.double()).abs().flatten(1).amax(1)


@torch.inference_mode()
def main(path: str) -> None:
    model, _ = checkpoint.load_model(path)
    model64 = copy.deepcopy(model).double()
    images, _ = data.load("mnist", "test")
    pixels = torch.as_tensor(images).unsqueeze(1)
    generator = torch.Generator().manual_seed(0)
    xs = torch.cat([dequantize(pixels[s : s + 1000], generator) for s in range(0, len(pixels), 1000)])
    errors = torch.cat([round_trip(model, x, model.transform(x)[0]) for x in xs.split(1000)])
    print(f"float32: {int((errors > 1e-4).sum())} of {len(errors)} images above 1e-4, "
          f"{int((errors > 1e-3).sum())} above 1e-3; max {float(errors.max()):.3g}")
    worst = errors.argsort(descending=True)[:8]
    x = xs[worst].double()
    print("the worst eight:", [f"{e:.3g}" for e in errors[worst].tolist()],
          "in float64:", [f"{e:.2g}" for e in round_trip(model64, x, model64.transform(x)[0]).tolist()])
    x = xs[:1000]
    mixed = {"float32 forward, float64 inverse": round_trip(model64, x, model.transform(x)[0]),
             "float64 forward, float32 inverse": round_trip(model, x, model64.transform(x.double())[0])}
    for name, e in mixed.items():
        print(f"{name}: {int((e > 1e-4).sum())} of 1000 above 1e-4; max {float(e.max()):.3g}")
    per_layer(model, xs[worst])


def per_layer(model, x: torch.Tensor) -> None:
    """Each mixture coupling alone, on the inputs it sees for ``x``: its float32 round trip."""
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, args, out, name=name: inputs.setdefault(name, args) and None)
             for name, m in model.named_modules() if type(m).__name__ == "MixtureCoupling2d"]
    model.transform(x)
    for h in hooks:
        h.remove()
    modules = dict(model.named_modules())
    for name, args in inputs.items():
        layer, x_in = modules[name], args[0]
        z = layer(*args)[0]
        error = float((layer.inverse(z, *args[1:])[0] - x_in).abs().max())
        print(f"{name}: max |x| {float(x_in.abs().max()):.3g}, round trip alone {error:.3g}")


if __name__ == "__main__":
    main(sys.argv[1])
