"""The optimizer: Adam with a choice of kernel, the learning-rate schedule, one guarded optimizer
step, and Polyak (EMA) averages of the weights."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from couplings import distributed
from couplings.config import TrainConfig

__all__ = ["ADAM_KERNELS", "EMA", "lr_factor", "make_adam", "optimizer_step", "warmup_factor"]

# The ``adam`` option's explicit choices -> torch.optim.Adam keyword arguments.
ADAM_KERNELS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def make_adam(
    params: Iterable[torch.nn.Parameter], *, lr: float, betas: tuple[float, float], eps: float,
    weight_decay: float, kernel: str = "default",
) -> torch.optim.Adam:
    """Adam with one of `ADAM_KERNELS`, or "auto": the fused kernel where this PyTorch has one
    for the parameters' device, else the default."""
    params = list(params)
    options = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
    if kernel == "auto":
        try:
            return torch.optim.Adam(params, fused=True, **options)
        except RuntimeError:  # e.g. an older PyTorch without a fused CPU Adam
            return torch.optim.Adam(params, **options)
    return torch.optim.Adam(params, **options, **ADAM_KERNELS[kernel])


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The linear learning-rate warm-up: (step + 1) / warmup_steps, at most 1."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The learning rate at ``step`` as a multiple of ``lr``: the warm-up, then the schedule
    (constant; ``lr_decay`` per epoch; or a cosine from 1 to 0 over ``schedule_steps``, by
    default all ``epochs``), counted from the end of the warm-up."""
    after = max(0, step - cfg.warmup_steps)
    if cfg.lr_schedule == "exponential":
        decay = cfg.lr_decay ** (after / steps_per_epoch)
    elif cfg.lr_schedule == "cosine":
        total = cfg.schedule_steps or cfg.epochs * steps_per_epoch
        decay = 0.5 * (1 + math.cos(math.pi * min(1.0, after / total)))
    else:
        decay = 1.0
    return warmup_factor(step, cfg.warmup_steps) * decay


class EMA:
    """Polyak averages of a model's floating-point state, ``shadow <- d * shadow + (1 - d) * w``
    after every step; other state (counters, flags) is copied.

    ``d = min(decay, (1 + step) / (10 + step))``: early on the average forgets faster, so that it
    is not dragged back to the initial weights (an average with decay 0.99 from step 0 still puts
    27% of its weight on them after 130 steps; measured in results/curves/, see the README).

    References:
        Polyak and Juditsky, "Acceleration of stochastic approximation by averaging", 1992.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                self.shadow[key].lerp_(value, 1 - decay)
            else:
                self.shadow[key].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            self.shadow[key].copy_(value)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own ones again after it."""
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield
        finally:
            model.load_state_dict(own)


def optimizer_step(optimizer: torch.optim.Optimizer, objective: torch.Tensor, *, grad_clip: float | None,
                   lr_factor: float) -> float | None:
    """One update, or none: a non-finite objective or gradient norm skips the step (the weights
    and the optimizer state stay as they were) and returns None. Otherwise the gradient norm is
    clipped at ``grad_clip`` (if set), each group steps at its initial learning rate times
    ``lr_factor``, and the gradient norm (before clipping) is returned.

    Under torchrun the gradients are first averaged over the ranks, and a step that is not
    finite on one rank is skipped on all. The finiteness check is the step's one host
    synchronisation (with the all-reduce, under torchrun).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad(set_to_none=True)
    finite = bool(torch.isfinite(objective))
    if finite:  # backward through a NaN loss is wasted work
        objective.backward()
    finite = distributed.average_gradients(params, finite)  # under torchrun; false on all ranks if on any
    if finite:
        if grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        finite = torch.isfinite(norm)
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        return None
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])  # kept in the optimizer's state_dict
        group["lr"] = group["base_lr"] * lr_factor
    optimizer.step()
    return norm.item()
