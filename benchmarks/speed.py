"""Training and sampling throughput (images/s) of a pixel-space model, one JSON line per measurement.

    python benchmarks/speed.py                                   # NICE, paper size, batch 200
    python benchmarks/speed.py --model realnvp --size small --batch-size 64 --steps 5
    python benchmarks/speed.py --compile --adam fused               # the training fast paths

Training steps are full optimizer steps (forward, backward, Adam) on dequantized random
images, through the same loss and optimizer the trainer builds (`couplings.training`), after two
warm-up steps (a compiled loss compiles in the first); sampling draws batches under
inference_mode.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from couplings.models import build_model
from couplings.hardware import describe, resolve_device
from couplings.models import MODELS
from couplings.training.optim import make_adam
from couplings.training.pixel import training_nll


def _timed(fn, repeats: int, device: torch.device) -> float:
    fn(), fn()  # warm-up (and compilation)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nice", choices=[m for m in MODELS if m != "latent-realnvp"])
    parser.add_argument("--size", help="a preset of the model (default: its first, the paper's size)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--sample-batch", type=int, default=1000)
    parser.add_argument("--compile", action="store_true", help="torch.compile the training loss")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--adam", default="auto", choices=["auto", "default", "foreach", "fused"])
    args = parser.parse_args()

    entry = MODELS[args.model]
    size = args.size or next(iter(entry.presets))
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model_part, _ = entry.preset(size)
    model = build_model(args.model, vars(entry.config(**model_part))).to(device)
    cfg = entry.train_config(compile=args.compile, precision=args.precision, channels_last=args.channels_last,
                             adam=args.adam)
    optimizer = make_adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                          kernel=cfg.adam)
    nll = training_nll(model, cfg, device)
    pixels = torch.randint(0, 256, (args.batch_size, 1, 28, 28), dtype=torch.uint8, device=device)

    def train_step():
        loss = nll(pixels, torch.rand(pixels.shape, device=device))  # the uniform dequantization noise
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    sample_batch = args.sample_batch

    def sample():
        model.eval()
        model.sample(sample_batch)

    common = {"model": args.model, "size": size, "parameters": sum(p.numel() for p in model.parameters()),
              "hardware": describe(device), "compile": args.compile, "precision": args.precision,
              "channels_last": args.channels_last, "adam": args.adam}
    seconds = _timed(train_step, args.steps, device)
    print(json.dumps({**common, "measure": "train_images_per_s", "batch_size": args.batch_size,
                      "steps": args.steps, "value": round(args.steps * args.batch_size / seconds, 1)}))
    repeats = max(3, args.steps // 5)
    seconds = _timed(sample, repeats, device)
    print(json.dumps({**common, "measure": "sample_images_per_s", "batch_size": sample_batch,
                      "repeats": repeats, "value": round(repeats * sample_batch / seconds, 1)}))


if __name__ == "__main__":
    main()
