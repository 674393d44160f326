"""How close one training step comes to what this CPU can do: FLOPs, achieved GFLOP/s, measured peaks.

    OMP_NUM_THREADS=1 python benchmarks/roofline.py realnvp --set size=fast --threads 1
    python benchmarks/roofline.py glow --set size=fast --threads 2 --json results/roofline.jsonl

For one training step of the model (forward, backward and Adam, on MNIST-shaped pixels, through
the trainer's own loss, `couplings.training.pixel.training_nll`):

- the FLOPs per image of the forward and backward passes, counted by
  `torch.utils.flop_counter.FlopCounterMode` (matrix products and convolutions only: the
  element-wise work, normalisation and the optimizer are not counted, which is what a roofline of
  the dominant kernels asks for);
- the measured training images/s, and so the achieved GFLOP/s;
- the measured peak of this CPU for the step's dominant kernels: each convolution shape of the
  step, run alone in a loop (forward only, float32 and bfloat16), and a 1024^3 matrix product as
  the machine's ceiling, all timed in this process with the same threads;
- the profile's top operators (torch.profiler, self CPU time), so the gap is explained.

One JSON object is printed (and appended to ``--json``); ``--markdown`` prints the table rows that
docs/results.md shows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from couplings.config import apply_overrides, split_overrides
from couplings.hardware import describe
from couplings.models import MODELS, build_model
from couplings.training.optim import make_adam
from couplings.training.pixel import training_nll


def build(model_name: str, overrides: list[str]):
    """The model and training config that ``couplings train MODEL --set ...`` would build."""
    entry = MODELS[model_name]
    size, model_overrides, train_overrides = split_overrides(overrides, entry.config, entry.train_config, model_name)
    preset_model, preset_train = entry.preset(size or next(iter(entry.presets)))
    cfg = apply_overrides(entry.train_config(), {**preset_train, **train_overrides})
    torch.manual_seed(0)
    model = build_model(model_name, vars(apply_overrides(entry.config(), {**preset_model, **model_overrides})))
    return model, cfg


def seconds_per_call(fn, *, min_seconds: float = 1.0, warmup: int = 2) -> float:
    """Mean wall-clock of one call of ``fn``, over at least ``min_seconds`` of calls after ``warmup`` ones."""
    for _ in range(warmup):
        fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds or calls < 3:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def conv_shapes(model, step) -> Counter:
    """The 2-D convolutions one call of ``step`` runs in the forward pass, as (input shape, weight
    shape, stride, padding, groups) -> calls."""
    seen: Counter = Counter()

    def hook(module, inputs, output):
        seen[(tuple(inputs[0].shape), tuple(module.weight.shape), module.stride, module.padding, module.groups)] += 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        step()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def conv_peak(shape: tuple, dtype: torch.dtype) -> float:
    """GFLOP/s of one convolution shape run alone, forward only."""
    x_shape, w_shape, stride, padding, groups = shape
    x, w = torch.randn(x_shape, dtype=dtype), torch.randn(w_shape, dtype=dtype)
    out = F.conv2d(x, w, stride=stride, padding=padding, groups=groups)
    flops = 2 * out.numel() * w_shape[1] * w_shape[2] * w_shape[3]
    seconds = seconds_per_call(lambda: F.conv2d(x, w, stride=stride, padding=padding, groups=groups), min_seconds=0.5)
    return flops / seconds / 1e9


def matmul_peak(dtype: torch.dtype, n: int = 1024) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / seconds_per_call(lambda: a @ b) / 1e9


def roofline(model_name: str, overrides: list[str], *, threads: int, batch_size: int | None, seconds: float,
             top: int = 10) -> dict:
    torch.set_num_threads(threads)
    model, cfg = build(model_name, overrides)
    batch = batch_size or cfg.batch_size
    device = torch.device("cpu")
    nll = training_nll(model, cfg, device)
    # FLOPs and convolution shapes are counted on the eager loss: a compiled graph's kernels bypass
    # the dispatcher that FlopCounterMode and the forward hooks see. The timing uses ``nll``.
    eager_nll = training_nll(model, dataclasses.replace(cfg, compile=False), device) if cfg.compile else nll
    optimizer = make_adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                          weight_decay=cfg.weight_decay, kernel=cfg.adam)
    shape = model.event_shape if hasattr(model, "event_shape") else (1, 28, 28)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (batch, *shape), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, model.num_classes, (batch,), generator=generator) if model.conditional else None

    def forward_backward(loss_fn=nll):
        loss = loss_fn(pixels, torch.rand(pixels.shape, generator=generator), labels)
        loss.backward()

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        forward_backward()
        optimizer.step()

    train_step()  # ActNorm's data-dependent start and the optimizer's state, before counting
    with FlopCounterMode(display=False) as counter:
        forward_backward(eager_nll)
    flops_per_image = counter.get_total_flops() / batch
    by_op = {str(op): n / batch for op, n in counter.get_flop_counts().get("Global", {}).items()}

    step_seconds = seconds_per_call(train_step, min_seconds=seconds)
    images_per_s = batch / step_seconds
    achieved = flops_per_image * images_per_s / 1e9

    shapes = conv_shapes(model, lambda: forward_backward(eager_nll))
    conv_flops = {s: 2 * n * _conv_out_numel(s) * s[1][1] * s[1][2] * s[1][3] for s, n in shapes.items()}
    dominant = sorted(conv_flops, key=conv_flops.get, reverse=True)[:3]
    total_conv = sum(conv_flops.values()) or 1.0
    kernels = [{"input": list(s[0]), "weight": list(s[1]), "share_of_forward_conv_flops": round(conv_flops[s] / total_conv, 3),
                "fp32_gflops": round(conv_peak(s, torch.float32), 1), "bf16_gflops": round(conv_peak(s, torch.bfloat16), 1)}
               for s in dominant]
    # The peak of the step's kernel mix: the dominant shapes' float32 rates weighted by their FLOPs.
    shares = [k["share_of_forward_conv_flops"] for k in kernels]
    mix_peak = sum(shares) / sum(s / k["fp32_gflops"] for s, k in zip(shares, kernels)) if kernels else None

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for _ in range(3):
            train_step()
    events = sorted(profile.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_self = sum(e.self_cpu_time_total for e in events) or 1.0
    top_ops = [{"op": e.key, "self_share": round(e.self_cpu_time_total / total_self, 3), "calls_per_step": e.count // 3}
               for e in events[:top]]

    return {
        "model": model_name, "overrides": overrides, "threads": threads, "batch_size": batch,
        "parameters": sum(p.numel() for p in model.parameters()), "hardware": describe(device),
        "train_images_per_s": round(images_per_s, 1), "mflop_per_image": round(flops_per_image / 1e6, 1),
        "mflop_per_image_by_op": {k: round(v / 1e6, 1) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
        "achieved_gflops": round(achieved, 2),
        "dominant_convolutions": kernels,
        "conv_mix_fp32_peak_gflops": round(mix_peak, 1) if mix_peak else None,
        "share_of_conv_mix_peak": round(achieved / mix_peak, 3) if mix_peak else None,
        "matmul_1024_fp32_gflops": round(matmul_peak(torch.float32), 1),
        "matmul_1024_bf16_gflops": round(matmul_peak(torch.bfloat16), 1),
        "top_ops": top_ops,
        "date": time.strftime("%Y-%m-%d"),
    }


def _conv_out_numel(shape: tuple) -> int:
    (n, _, h, w), (c_out, _, kh, kw), stride, padding, _ = shape
    return n * c_out * ((h + 2 * padding[0] - kh) // stride[0] + 1) * ((w + 2 * padding[1] - kw) // stride[1] + 1)


def markdown_row(result: dict) -> str:
    ops = ", ".join(f"{o['op']} {100 * o['self_share']:.0f}%" for o in result["top_ops"][:4])
    return (f"| {result['model']} {' '.join(result['overrides'])} | {result['threads']} | {result['train_images_per_s']} "
            f"| {result['mflop_per_image']} | {result['achieved_gflops']} | {result['conv_mix_fp32_peak_gflops']} "
            f"| {100 * result['share_of_conv_mix_peak']:.0f}% | {result['matmul_1024_fp32_gflops']} "
            f"/ {result['matmul_1024_bf16_gflops']} | {ops} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=[m for m in MODELS if m != "latent-realnvp"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, help="default: the model's training batch size")
    parser.add_argument("--seconds", type=float, default=20.0, help="time the training step over at least this long")
    parser.add_argument("--json", type=Path, help="also append the result to this JSONL file")
    parser.add_argument("--markdown", action="store_true", help="also print the docs table row")
    args = parser.parse_args()
    result = roofline(args.model, args.overrides, threads=args.threads, batch_size=args.batch_size, seconds=args.seconds)
    line = json.dumps(result)
    print(line)
    if args.json:
        with args.json.open("a") as f:
            f.write(line + "\n")
    if args.markdown:
        print(markdown_row(result))


if __name__ == "__main__":
    main()
