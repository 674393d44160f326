"""The prepared GPU check: everything worth measuring on one CUDA GPU, in about 8 minutes, into
one JSON file.

    python scripts/gpu_check.py --out gpu-check.json           # on a machine with a CUDA GPU
    python scripts/gpu_check.py --smoke --out smoke.json       # anywhere, on the CPU, in about a minute

In order, each part with its own time limit, a failing part recorded and the rest still run:

1. ``tests``: the CUDA tests, every fast path (float32, bf16 autocast, compile, channels-last,
   the Adam kernels) on the GPU against the CPU result on the same weights
   (``tests/test_fast_paths.py -m cuda``), TF32 off.
2. ``speed``: training and sampling throughput of NICE, Real NVP and Glow at their paper sizes
   (``benchmarks/speed.py``), float32 with fused Adam, and bf16.
3. ``peer``: training throughput against normflows on the matched architectures at full size
   (``benchmarks/peer.py --device cuda --size full``), when normflows is installed.
4. ``training``: ``couplings train realnvp --set size=fast`` for a few minutes on MNIST, stopping
   at 1.10 validation bits/dim; the minutes it took (or the bits/dim it reached).

``--smoke`` runs the same steps on the CPU with tiny sizes and step counts (the CUDA tests
against the CPU itself), so that CI keeps this script working; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("nice", "realnvp", "glow")


def _run(command: list[str], timeout: float, env: dict | None = None) -> dict:
    """Runs one part; returns its return code, wall-clock seconds, the JSON lines it printed and
    the tail of its output."""
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        rc, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = "timeout", (e.stdout or b"").decode(errors="replace"), (e.stderr or b"").decode(errors="replace")
    lines = []
    for line in out.splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                pass
    return {"command": " ".join(command), "rc": rc, "seconds": round(time.perf_counter() - started, 1),
            "json": lines, "tail": (out + err)[-1500:]}


def _tests(smoke: bool) -> dict:
    # In smoke mode the compiled convolutional flows are skipped (minutes of compiling on a CPU).
    env = {"COUPLINGS_TEST_DEVICE": "cpu", "COUPLINGS_SLOW_TESTS": ""} if smoke else {"COUPLINGS_TEST_DEVICE": "cuda"}
    return _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fast_paths.py", "-m", "cuda"],
                timeout=150, env=env)


def _speed(smoke: bool, device: str) -> list[dict]:
    parts = []
    for model in MODELS:
        for extra in (["--adam", "fused"], ["--adam", "fused", "--precision", "bf16"]):
            size = ["--size", "small", "--steps", "2", "--batch-size", "8", "--sample-batch", "8"] if smoke else \
                   ["--steps", "20", "--batch-size", "64" if model != "nice" else "200"]
            parts.append(_run([sys.executable, "benchmarks/speed.py", "--model", model, "--device", device, *size, *extra],
                              timeout=60 if smoke else 90))
    return parts


def _peer(smoke: bool, device: str) -> dict:
    try:
        import normflows  # noqa: F401  (a benchmark-only dependency)
    except ImportError:
        return {"skipped": "normflows is not installed (pip install normflows)"}
    size = ["--size", "small", "--steps", "1", "--batch-size", "8"] if smoke else ["--size", "full", "--steps", "10"]
    return _run([sys.executable, "benchmarks/peer.py", "--device", device, "--mode", "train", "--couplings-adam", "fused",
                 *size], timeout=60 if smoke else 150)


def _training(smoke: bool, device: str, minutes: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        budget = ["--set", "size=small", "--max-steps", "3", "--set", "val_size=100", "--set", "samples_per_epoch=4"] if smoke \
            else ["--set", "size=fast", "--max-minutes", str(minutes), "--set", "target_bpd=1.10"]
        part = _run([sys.executable, "-m", "couplings", "train", "realnvp", *budget, "--device", device, "--quiet",
                     "--out", str(out)], timeout=120 if smoke else 60 * minutes + 120)
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
            if (out / "metrics.jsonl").is_file() else []
    reached = next((m for m in metrics if m["val_bpd"] <= 1.10), None)
    part["epochs"] = [{k: m[k] for k in ("epoch", "step", "val_bpd", "images_per_s", "elapsed")} for m in metrics]
    part["minutes_to_1.10"] = round(reached["elapsed"] / 60, 2) if reached else None
    part["best_val_bpd"] = min((m["val_bpd"] for m in metrics), default=None)
    return part


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"))
    parser.add_argument("--smoke", action="store_true", help="the same steps on the CPU, tiny (for CI)")
    parser.add_argument("--minutes", type=float, default=3.0, help="training minutes of the last part (not in --smoke)")
    args = parser.parse_args(argv)

    import torch  # after parsing, so that --help is quick

    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible to torch; run with --smoke to check the script on the CPU")
    device = "cpu" if args.smoke else "cuda"
    started = time.perf_counter()
    report = {
        "mode": "smoke (CPU; the numbers mean nothing)" if args.smoke else "gpu",
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
    }

    def save():
        report["seconds"] = round(time.perf_counter() - started, 1)
        args.out.write_text(json.dumps(report, indent=2) + "\n")  # after every part: a timeout keeps what was done

    for name, part in (("tests", lambda: _tests(args.smoke)), ("speed", lambda: _speed(args.smoke, device)),
                       ("peer", lambda: _peer(args.smoke, device)),
                       ("training", lambda: _training(args.smoke, device, args.minutes))):
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        report[name] = part()
        save()
    failed = [name for name in ("tests", "peer", "training") if report[name].get("rc") not in (0, None)]
    failed += [f"speed {p['command'].split('--model ')[1].split()[0]}" for p in report["speed"] if p["rc"] != 0]
    report["failed"] = failed
    save()
    print(f"gpu_check: wrote {args.out} in {report['seconds']:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""),
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
