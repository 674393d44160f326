"""The optimizer: Adam with a choice of kernel, and one guarded optimizer step."""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["ADAM_KERNELS", "make_adam", "optimizer_step", "warmup_factor"]

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


def optimizer_step(optimizer: torch.optim.Optimizer, objective: torch.Tensor, *, grad_clip: float | None,
                   lr_factor: float) -> bool:
    """One update, or none: a non-finite objective or gradient norm skips the step (the weights
    and the optimizer state stay as they were) and returns False. Otherwise the gradient norm is
    clipped at ``grad_clip`` (if set) and each group steps at its initial learning rate times
    ``lr_factor``.

    The finiteness check is the step's one host synchronisation.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad(set_to_none=True)
    finite = torch.isfinite(objective)
    if finite:  # backward through a NaN loss is wasted work
        objective.backward()
        if grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        finite = torch.isfinite(norm)
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        return False
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])  # kept in the optimizer's state_dict
        group["lr"] = group["base_lr"] * lr_factor
    optimizer.step()
    return True
