"""A one-line description of the hardware a run used, for logs and reports."""

from __future__ import annotations

import platform

import torch

__all__ = ["describe", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cpu' and 'cuda' as given (cuda must exist)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, found {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but torch finds no CUDA GPU")
    return torch.device(name)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: torch.device) -> str:
    """E.g. 'CPU: AMD EPYC 9B14 (2 threads), torch 2.13.0' or 'GPU: NVIDIA H100 80GB HBM3, torch 2.11.0'."""
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU: {_cpu_name()} ({torch.get_num_threads()} threads), torch {torch.__version__}"
