"""Training images/s of a model's `size=fast` preset with its coupling networks in channels-last
(what couplings does on CPU) against plain NCHW, the two steps alternating in one process so that
both see the same CPU.

    OMP_NUM_THREADS=1 python scripts/analysis/memory_format_ab.py realnvp --threads 1 >> results/memory-format-ab.txt
"""
import argparse
import sys
import time
from pathlib import Path

import torch

import couplings.nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from ab_step import train_step

CHANNELS_LAST = couplings.nn.channels_last_on_cpu


def nchw(layers, x):
    return layers(x)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["realnvp", "glow"])
    parser.add_argument("--set", action="append", default=["size=fast"], dest="overrides")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each, alternating")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layouts = {"nchw": nchw, "channels_last": CHANNELS_LAST}
    steps = {name: train_step(args.model, args.overrides) for name in layouts}
    seconds = dict.fromkeys(layouts, 0.0)
    for round_ in range(args.steps + 2):  # two warm-up rounds
        for name, layout in layouts.items():
            couplings.nn.channels_last_on_cpu = layout
            started = time.perf_counter()
            steps[name][0]()
            if round_ >= 2:
                seconds[name] += time.perf_counter() - started
    couplings.nn.channels_last_on_cpu = CHANNELS_LAST
    speed = {name: args.steps * steps[name][1] / s for name, s in seconds.items()}
    print(f"{time.strftime('%Y-%m-%d')} {args.model} {' '.join(args.overrides)} threads={args.threads}: "
          f"NCHW {speed['nchw']:.1f}, channels-last {speed['channels_last']:.1f} images/s "
          f"(x{speed['channels_last'] / speed['nchw']:.2f})")


if __name__ == "__main__":
    main()
