"""Numerical faults: counting non-finite steps, naming the layer where one began, rolling back
to the last checkpoint, and the random states that a rollback or a resume restores."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from couplings.checkpoint import Checkpoint
from couplings.rundir import RunDir
from couplings.training.errors import TrainingError
from couplings.transforms import Transform

__all__ = ["FaultCounter", "NumericalFault", "locate_fault", "rng_states", "roll_back", "set_rng_states"]


class NumericalFault(ArithmeticError):
    """``max_bad_steps`` consecutive steps had a non-finite loss or gradient; ``where`` names
    the first layer whose output or log-det was non-finite."""

    def __init__(self, step: int, bad_steps: int, where: str):
        super().__init__(f"{bad_steps} consecutive non-finite steps ending at step {step}; {where}")
        self.step, self.where = step, where


@dataclass
class FaultCounter:
    """Non-finite steps in a row, and the rollbacks made so far with their learning-rate scale."""

    max_bad_steps: int
    bad_streak: int = 0
    rollbacks: int = 0
    lr_scale: float = 1.0  # lowered by each rollback

    def count(self, good: bool, step: int, where: Callable[[], str]) -> None:
        """Records one step; after ``max_bad_steps`` bad ones in a row raises `NumericalFault`,
        with ``where()`` (called only then) naming the layer."""
        self.bad_streak = 0 if good else self.bad_streak + 1
        if self.bad_streak >= self.max_bad_steps:
            raise NumericalFault(step, self.bad_streak, where())


def rng_states() -> dict:
    """Every global random state training touches: torch (CPU and CUDA), numpy and Python."""
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "python": [version, list(mt), gauss],
    }


def set_rng_states(states: dict) -> None:
    """Restores `rng_states` (a format-1 checkpoint kept torch's CPU state only)."""
    torch.set_rng_state(states["torch"])
    if "numpy" not in states:
        return
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, mt, gauss = states["python"]
    random.setstate((version, tuple(mt), gauss))


@contextmanager
def _non_finite_trace(model: nn.Module) -> Iterator[list[str]]:
    """Records, in call order, the flow layers whose output or log-det comes out non-finite."""
    found: list[str] = []
    names = {module: name for name, module in model.named_modules()}

    def hook(module, inputs, outputs):
        tensors = outputs if isinstance(outputs, tuple) else (outputs,)
        for part, t in zip(("output", "log-det"), tensors):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
                found.append(f"{part} of layer {names[module] or type(module).__name__} ({type(module).__name__})")
                return

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, Transform)]
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def locate_fault(model: nn.Module, objective: Callable[[], torch.Tensor]) -> str:
    """Re-runs a failing batch (``objective()``) with hooks on every flow layer to name where it went wrong."""
    # The hooks must see every layer: run eagerly even if the loss was compiled.
    with torch.compiler.set_stance("force_eager"), _non_finite_trace(model) as found:
        value = objective()
    if found:
        return f"the first non-finite value was the {found[0]}"
    if not torch.isfinite(value):
        return "every layer was finite; the prior or the penalty term was not"
    model.zero_grad(set_to_none=True)
    value.backward()
    names = [name for name, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    model.zero_grad(set_to_none=True)
    if names:
        return f"the forward pass was finite; the gradient of {names[0]} was not"
    return "the fault did not recur when the batch was re-run"


def roll_back(fault: NumericalFault, faults: FaultCounter, run_dir: RunDir, model: nn.Module,
              max_rollbacks: int, lr_factor: float) -> Checkpoint:
    """After a `NumericalFault`: restores the model and the random states from ``last.pt`` and
    lowers the learning rate by ``lr_factor``, at most ``max_rollbacks`` times; returns the
    checkpoint to continue from.

    Raises:
        TrainingError: The rollbacks are used up (or there is no ``last.pt``).
    """
    if faults.rollbacks >= max_rollbacks or not run_dir.last.is_file():
        raise TrainingError(
            f"training diverged: {fault} (after {faults.rollbacks} rollback(s) with a lower learning rate); "
            f"the last good state is in {run_dir.last}"
        )
    state = run_dir.newest_intact()[1]
    model.load_state_dict(state.model_state)
    set_rng_states(state.rng)
    faults.rollbacks += 1
    faults.lr_scale = state.lr_scale * lr_factor
    faults.bad_streak = 0
    return state
