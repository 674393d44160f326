"""Training and sampling throughput of NICE (images/s), printed as one JSON line per measurement.

    python benchmarks/nice_speed.py [--size paper|small] [--device cpu|cuda] [--steps 30]

Training steps are full optimizer steps (forward, backward, Adam) on dequantized random
images at the paper's batch of 200; sampling draws batches of 1000 under no_grad.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from couplings.evaluate import dequantize
from couplings.hardware import describe, resolve_device
from couplings.models import MODELS, NICE


def _timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
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
    parser.add_argument("--size", default="paper", choices=sorted(MODELS["nice"].presets))
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=200)
    args = parser.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = NICE(**MODELS["nice"].presets[args.size]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-4)
    pixels = torch.randint(0, 256, (args.batch_size, 1, 28, 28), dtype=torch.uint8, device=device)

    def train_step():
        loss = -model.log_prob(dequantize(pixels)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    sample_batch = 1000

    def sample():
        model.sample(sample_batch)

    common = {"model": "nice", "size": args.size, "parameters": sum(p.numel() for p in model.parameters()),
              "hardware": describe(device)}
    seconds = _timed(train_step, args.steps, device)
    print(json.dumps({**common, "measure": "train_images_per_s", "batch_size": args.batch_size,
                      "steps": args.steps, "value": round(args.steps * args.batch_size / seconds, 1)}))
    repeats = max(3, args.steps // 5)
    seconds = _timed(sample, repeats, device)
    print(json.dumps({**common, "measure": "sample_images_per_s", "batch_size": sample_batch,
                      "repeats": repeats, "value": round(repeats * sample_batch / seconds, 1)}))


if __name__ == "__main__":
    main()
