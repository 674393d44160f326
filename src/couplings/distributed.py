"""Training on several processes started by ``torchrun``: who this process is, its share of a
batch, and the few collectives a training step needs.

Every rank holds the same model, optimizer, random states and data order, and takes the same
decisions: each trains on its contiguous share of every global batch, the gradients are averaged
with one all-reduce per step (which also carries a "this rank's loss was not finite" flag, so a
bad step is skipped everywhere), floating-point buffers (batch-norm running averages) are taken
from rank 0 after each step, and the stop decisions (time budget, signals) are reduced so that
every rank stops after the same step. Only rank 0 writes the run directory.

On one process (no ``torchrun``, or ``--nproc_per_node 1``) every function here is a no-op that
returns its input, so single-process training is unchanged bit for bit.

We average gradients ourselves instead of wrapping the model in
`torch.nn.parallel.DistributedDataParallel`: our objectives call methods other than
``forward`` (``pixel_log_prob``, ``embedding_log_prob``, the autoencoder's loss), which that
wrapper does not see, and a step must be skippable on every rank at once.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["DistributedError", "average", "average_gradients", "barrier", "broadcast_buffers", "device_for", "in_sync",
           "is_main", "launched", "max_over_ranks", "mean_over_ranks", "rank", "shard", "start", "stop", "world_size"]

TIMEOUT_VARIABLE = "COUPLINGS_DIST_TIMEOUT"  # seconds a collective may wait for the other ranks
DEFAULT_TIMEOUT = 600.0


class DistributedError(RuntimeError):
    """A collective failed: another rank died, or did not arrive within the timeout."""


def launched() -> bool:
    """True when this process was started by torchrun (or anything that sets its variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def world_size() -> int:
    """The number of training processes: ``$WORLD_SIZE`` under torchrun, else 1."""
    return int(os.environ.get("WORLD_SIZE", 1)) if launched() else 1


def rank() -> int:
    return int(os.environ.get("RANK", 0)) if launched() else 0


def is_main() -> bool:
    """True on rank 0, the one process that writes the run directory and prints progress."""
    return rank() == 0


def _active() -> bool:
    return world_size() > 1 and dist.is_initialized()


def device_for(device: torch.device) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` for a CUDA run under torchrun (one GPU per rank)."""
    if device.type == "cuda" and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def start(device: torch.device) -> bool:
    """Joins the other ranks (gloo on CPU, NCCL on CUDA) and returns True once all have joined;
    returns False (and does nothing) on one process or when a process group already exists."""
    if world_size() == 1 or dist.is_initialized():
        return False
    # torch.distributed.nn.functional takes ``group=group.WORLD`` as a default argument, evaluated
    # when it is imported; imported after the process group exists (the first torch.optim
    # optimizer imports it, through torch._dynamo), it keeps the group, its gloo threads and its
    # sockets alive after `stop`, until the interpreter tears them down at exit, where a gloo
    # thread that needs the GIL aborts the process ("terminate called without an active
    # exception"). Imported first, its default is None.
    import torch.distributed.nn

    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_VARIABLE, DEFAULT_TIMEOUT)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return True


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _collective(name: str, call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except (RuntimeError, dist.DistError) as e:  # gloo reports a vanished peer or a timeout as RuntimeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(f"rank {rank()} of {world_size()}: {name} failed: another rank stopped or did not "
                               f"answer within {os.environ.get(TIMEOUT_VARIABLE, DEFAULT_TIMEOUT)} s ({first})") from None


def barrier() -> None:
    if _active():
        _collective("a barrier", dist.barrier)


def shard(t: Tensor) -> Tensor:
    """This rank's contiguous share of a global batch along dimension 0 (the whole of it on one
    process). The batch size must be a multiple of the world size (checked when a run starts)."""
    if world_size() == 1:
        return t
    return t.tensor_split(world_size())[rank()]


def _all_reduce(name: str, t: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
    _collective(name, dist.all_reduce, t, op=op)
    return t


def average(value: Tensor) -> float:
    """The mean over ranks of a scalar (each rank's mean over its equal share: the global mean)."""
    if not _active():
        return value.item()
    return _all_reduce("averaging the loss", value.detach().double().reshape(1).clone()).item() / world_size()


def mean_over_ranks(t: Tensor) -> Tensor:
    """The element-wise mean of ``t`` over ranks (``t`` itself on one process)."""
    if not _active():
        return t
    return _all_reduce("a data-dependent initialisation", t.clone()) / world_size()


def max_over_ranks(*values: float) -> list[float]:
    """The element-wise maximum over ranks of a few numbers (flags, a signal number): what every
    rank decides on when each knows part of it."""
    if not _active():
        return list(values)
    return _all_reduce("agreeing to stop", torch.tensor(values, dtype=torch.float64, device=_device()),
                       dist.ReduceOp.MAX).tolist()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def average_gradients(params: list[nn.Parameter], finite: bool) -> bool:
    """Averages the gradients of ``params`` over ranks in one all-reduce; returns False on every
    rank when any rank's objective was not finite (``finite`` false), so that the step is skipped
    everywhere. A rank whose objective was not finite took no backward pass; it sends zeros.

    A gradient that is None stays None (it is None on every rank: they run the same graph)."""
    if not _active():
        return finite
    flat, views = _gradient_buffer(params)
    for p, view in zip(params, views):
        if finite and p.grad is not None:
            view.copy_(p.grad)
        else:
            view.zero_()
    flat[-1] = 0.0 if finite else 1.0
    _all_reduce("averaging the gradients", flat)
    if flat[-1].item() > 0:
        return False
    flat /= world_size()
    for p, view in zip(params, views):
        if p.grad is not None:
            p.grad.copy_(view)
    return True


_BUFFERS: dict[tuple, tuple[Tensor, list[Tensor]]] = {}


def _gradient_buffer(params: list[nn.Parameter]) -> tuple[Tensor, list[Tensor]]:
    """One flat buffer for the gradients of ``params`` and a flag, kept from step to step (a
    fresh 20 MB buffer per step costs NICE more in page faults than the all-reduce itself), and
    its views shaped like each parameter."""
    key = tuple((id(p), p.shape, p.dtype, p.device) for p in params)
    if key not in _BUFFERS:
        flat = torch.empty(sum(p.numel() for p in params) + 1, device=params[0].device, dtype=params[0].dtype)
        views, offset = [], 0
        for p in params:
            views.append(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        _BUFFERS.clear()  # one optimizer at a time (the latent trainer's second stage replaces the first)
        _BUFFERS[key] = flat, views
    return _BUFFERS[key]


def broadcast_buffers(model: nn.Module) -> None:
    """Copies rank 0's floating-point buffers (batch-norm running averages) to every rank."""
    if not _active():
        return
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.flatten().to(torch.float64) for b in buffers])
    _collective("sharing the buffers", dist.broadcast, flat, 0)
    offset = 0
    for b in buffers:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()


def in_sync(model: nn.Module) -> bool:
    """True when every rank holds the same parameters (compared through a sum and a sum of
    squares of each parameter, max and min over ranks; a cheap guard, run after each epoch)."""
    if not _active():
        return True
    summary = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                           for p in model.parameters()]).flatten()
    high, low = summary.clone(), summary.clone()
    _all_reduce("checking the ranks agree", high, dist.ReduceOp.MAX)
    _all_reduce("checking the ranks agree", low, dist.ReduceOp.MIN)
    return bool(torch.equal(high, low))
