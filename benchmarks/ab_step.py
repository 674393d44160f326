"""Two variants of one training step, timed alternately in one process: a model's options against
the same with some options changed (a fast path such as ``compile=true`` or ``precision=bf16``).

    OMP_NUM_THREADS=1 python benchmarks/ab_step.py realnvp --set size=fast --against compile=true

Each variant is built as ``couplings train MODEL --set ...`` would build it (seed 0) and warmed up
(for ``compile=true`` the warm-up is the compilation, reported separately); then their steps
(forward, backward and Adam on one fixed batch of MNIST-shaped pixels) alternate, so both see the
same CPU. One line of JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from roofline import build

from couplings.hardware import describe
from couplings.training.optim import make_adam
from couplings.training.pixel import training_nll


def train_step(model_name: str, overrides: list[str]):
    """One training step of the model ``couplings train MODEL --set ...`` builds, and its batch size."""
    model, cfg = build(model_name, overrides)
    nll = training_nll(model, cfg, torch.device("cpu"))
    optimizer = make_adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                          weight_decay=cfg.weight_decay, kernel=cfg.adam)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (cfg.batch_size, *model.event_shape), dtype=torch.uint8, generator=generator)
    noise = torch.rand(pixels.shape, generator=generator)

    def step():
        optimizer.zero_grad(set_to_none=True)
        nll(pixels, noise, None).backward()
        optimizer.step()
    return step, cfg.batch_size


def compare(model_name: str, overrides: list[str], against: list[str], *, steps: int, warmup: int = 3) -> dict:
    variants = {"base": overrides, "variant": overrides + against}
    built, warmup_seconds = {}, {}
    for name, options in variants.items():
        built[name] = train_step(model_name, options)
        started = time.perf_counter()
        for _ in range(warmup):
            built[name][0]()
        warmup_seconds[name] = round(time.perf_counter() - started, 1)
    seconds = dict.fromkeys(variants, 0.0)
    for _ in range(steps):
        for name, (step, _) in built.items():
            started = time.perf_counter()
            step()
            seconds[name] += time.perf_counter() - started
    rates = {name: steps * built[name][1] / seconds[name] for name in variants}
    return {"model": model_name, "overrides": overrides, "against": against, "threads": torch.get_num_threads(),
            "hardware": describe(torch.device("cpu")), "base_images_per_s": round(rates["base"], 1),
            "variant_images_per_s": round(rates["variant"], 1), "speedup": round(rates["variant"] / rates["base"], 2),
            "warmup_seconds": warmup_seconds, "steps": steps, "date": time.strftime("%Y-%m-%d")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["nice", "realnvp", "glow"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
    parser.add_argument("--against", action="append", required=True, metavar="KEY=VALUE",
                        help="the options the variant changes (repeatable)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each variant")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(compare(args.model, args.overrides, args.against, steps=args.steps)))


if __name__ == "__main__":
    main()
