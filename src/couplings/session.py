"""State shared by every training loop: budgets, batches, logging and checkpoints of one run."""

from __future__ import annotations

import json
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from couplings import checkpoint
from couplings.config import ConfigError, TrainConfig
from couplings.images import save_grid

__all__ = ["Session", "StoppedBySignal", "TrainingError"]


class TrainingError(RuntimeError):
    """Training cannot start or cannot go on (bad run directory, non-finite loss)."""


class StoppedBySignal(Exception):
    """SIGINT or SIGTERM stopped training after the current step; the run was checkpointed."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def _epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """Shuffling and dequantization noise of an epoch depend on (seed, epoch) alone, so a
    resumed run draws exactly what an uninterrupted one would."""
    return torch.Generator(device=device).manual_seed(seed * 100_003 + epoch)


@dataclass
class Session:
    """What one training invocation shares between the common set-up and a model's loop."""

    out: Path
    run: dict
    cfg: TrainConfig
    model: nn.Module
    device: torch.device
    state: dict | None  # the checkpoint resumed from, if any
    train_data: tuple[np.ndarray, np.ndarray]
    val_data: tuple[np.ndarray, np.ndarray]
    progress: bool
    started: float = field(default_factory=time.perf_counter)  # perf_counter() at elapsed = 0
    budget_start: float = field(default_factory=time.perf_counter)  # max_minutes counts this invocation
    stop_signal: int | None = None  # set by SIGINT/SIGTERM: stop after the current step

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def out_of_budget(self, step: int) -> bool:
        over_steps = self.cfg.max_steps is not None and step >= self.cfg.max_steps
        over_time = self.cfg.max_minutes is not None and time.perf_counter() - self.budget_start >= 60 * self.cfg.max_minutes
        return over_steps or over_time or self.stop_signal is not None

    @contextmanager
    def stop_on_signals(self):
        """While active, SIGINT and SIGTERM end training like a spent budget: the current step
        finishes, the (partial) epoch is validated and checkpointed, and `StoppedBySignal` is
        raised on exit. A second signal interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self.stop_signal is not None:
                raise KeyboardInterrupt
            self.stop_signal = signum
            self.report(f"{signal.Signals(signum).name}: stopping after the current step (again to abort)")

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        if self.stop_signal is not None:
            name = signal.Signals(self.stop_signal).name
            saved = (f"the run is checkpointed in {self.out / 'last.pt'} (continue with --resume)"
                     if (self.out / "last.pt").is_file() else "no checkpoint had been written yet")
            raise StoppedBySignal(f"stopped by {name}; {saved}", self.stop_signal)

    def batches(self, n: int, epoch: int):
        """Index tensors of full batches of a per-(seed, epoch) permutation, and its generator."""
        generator = _epoch_generator(self.cfg.seed, epoch, self.device)
        order = torch.randperm(n, generator=generator, device=self.device)
        count = n // self.cfg.batch_size  # the ragged last batch is dropped
        if count == 0:
            raise ConfigError(f"batch_size {self.cfg.batch_size} is larger than the {n} training examples")
        return [order[i * self.cfg.batch_size : (i + 1) * self.cfg.batch_size] for i in range(count)], generator

    def optimizer_step(self, optimizer: torch.optim.Optimizer, objective: torch.Tensor, step: int) -> None:
        """One update: refuses a non-finite objective, backpropagates, clips the gradient norm at
        ``grad_clip`` and warms the learning rate up linearly over ``warmup_steps``."""
        if not torch.isfinite(objective):
            raise TrainingError(
                f"non-finite loss {objective.item()} at step {step + 1}; the last good state is in {self.out / 'last.pt'}"
            )
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if self.cfg.grad_clip is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        if self.cfg.warmup_steps:
            for group in optimizer.param_groups:
                group.setdefault("base_lr", group["lr"])  # kept in the optimizer's state_dict
                group["lr"] = group["base_lr"] * min(1.0, (step + 1) / self.cfg.warmup_steps)
        optimizer.step()

    def run_epoch(self, optimizer, batches, loss_fn, *, step: int, desc: str, postfix) -> tuple[float, int, int]:
        """One pass over ``batches`` with a progress bar; stops early when out of budget.

        Args:
            loss_fn: ``idx -> (loss, objective)``; ``objective`` (the loss plus any penalty) is
                minimised and ``loss`` is averaged for the log.
            postfix: mean loss so far -> the text shown beside the bar.

        Returns:
            (mean loss, items seen, optimizer steps taken so far in the run).
        """
        total, seen = 0.0, 0
        bar = tqdm(batches, desc=desc, disable=not self.progress, leave=False)
        try:
            for i, idx in enumerate(bar):
                loss, objective = loss_fn(idx)
                self.optimizer_step(optimizer, objective, step)
                step += 1
                total, seen = total + loss.item() * len(idx), seen + len(idx)
                if i % 10 == 0:
                    bar.set_postfix_str(postfix(total / seen))
                if self.out_of_budget(step):
                    break
        finally:
            bar.close()
        return total / max(seen, 1), seen, step

    def log(self, record: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({**record, "elapsed": self.elapsed()}) + "\n")

    def save(self, fields: dict, improved: bool) -> None:
        """Writes last.pt (and best.pt when ``improved``) from the run, the model and ``fields``."""
        payload = {
            **{k: self.run[k] for k in ("model", "size", "model_config", "train", "hardware")},
            "model_state": self.model.state_dict(),
            "rng_state": torch.get_rng_state(),
            "elapsed": self.elapsed(),
            **fields,
        }
        checkpoint.save(payload, self.out / "last.pt")
        if improved:
            checkpoint.save(payload, self.out / "best.pt")

    def save_samples(self, images: torch.Tensor, epoch: int, nrow: int = 8) -> None:
        directory = self.out / "samples"
        directory.mkdir(exist_ok=True)  # a run directory copied without it must not crash the run
        save_grid(images, directory / f"epoch_{epoch:04d}.png", nrow=nrow)

    def report(self, text: str) -> None:
        if self.progress:
            tqdm.write(text)
