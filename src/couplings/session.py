"""State shared by every training loop: budgets, batches, faults, logging and checkpoints of one run."""

from __future__ import annotations

import json
import random
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
from couplings.transforms import Transform

__all__ = ["EpochPass", "NumericalFault", "Session", "StoppedBySignal", "TrainingError"]


class TrainingError(RuntimeError):
    """Training cannot start or cannot go on (bad run directory, a loss that stays non-finite)."""


class StoppedBySignal(Exception):
    """SIGINT or SIGTERM stopped training after the current step; the run was checkpointed."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class NumericalFault(ArithmeticError):
    """``max_bad_steps`` consecutive steps had a non-finite loss or gradient; ``where`` names
    the first layer whose output or log-det was non-finite."""

    def __init__(self, step: int, bad_steps: int, where: str):
        super().__init__(f"{bad_steps} consecutive non-finite steps ending at step {step}; {where}")
        self.step, self.where = step, where


def _epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """Shuffling and dequantization noise of an epoch depend on (seed, epoch) alone, so a
    resumed run draws exactly what an uninterrupted one would."""
    return torch.Generator(device=device).manual_seed(seed * 100_003 + epoch)


@dataclass
class EpochPass:
    """One pass over the training data: its batches, its noise generator and how far it got.

    ``index`` numbers passes across a run (a two-stage model numbers them across stages);
    ``next`` is the first batch not yet trained on; ``total`` and ``seen`` sum the loss over the
    batches trained on, ``skipped`` counts the steps refused as non-finite.
    """

    index: int
    batches: list[torch.Tensor]
    generator: torch.Generator
    next: int = 0
    total: float = 0.0
    seen: int = 0
    skipped: int = 0

    @property
    def complete(self) -> bool:
        return self.next == len(self.batches)

    def position(self) -> dict:
        """The checkpoint fields that let `Session.start_pass` continue this pass exactly."""
        return {"pass": {"index": self.index, "next": self.next, "total": self.total, "seen": self.seen,
                         "skipped": self.skipped, "generator": self.generator.get_state()}}


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
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, mt, gauss = states["python"]
    random.setstate((version, tuple(mt), gauss))


@contextmanager
def _non_finite_trace(model: nn.Module):
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


@dataclass
class Session:
    """What one training invocation shares between the common set-up and a model's loop."""

    out: Path
    run: dict
    cfg: TrainConfig
    model: nn.Module
    device: torch.device
    state: dict | None  # the checkpoint to start from (resumed or rolled back to), if any
    train_data: tuple[np.ndarray, np.ndarray]
    val_data: tuple[np.ndarray, np.ndarray]
    progress: bool
    started: float = field(default_factory=time.perf_counter)  # perf_counter() at elapsed = 0
    budget_start: float = field(default_factory=time.perf_counter)  # max_minutes counts this invocation
    stop_signal: int | None = None  # set by SIGINT/SIGTERM: stop after the current step
    lr_scale: float = 1.0  # lowered by each rollback after a numerical fault
    rollbacks: int = 0
    bad_streak: int = 0  # consecutive non-finite steps

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

    def start_pass(self, n: int, index: int) -> EpochPass:
        """Pass ``index`` over ``n`` examples in full batches of a per-(seed, index) permutation
        (the ragged last batch is dropped). If the checkpoint being started from stopped inside
        this pass, it continues from the next batch with the same noise generator state."""
        generator = _epoch_generator(self.cfg.seed, index, self.device)
        order = torch.randperm(n, generator=generator, device=self.device)
        count = n // self.cfg.batch_size
        if count == 0:
            raise ConfigError(f"batch_size {self.cfg.batch_size} is larger than the {n} training examples")
        batches = [order[i * self.cfg.batch_size : (i + 1) * self.cfg.batch_size] for i in range(count)]
        stored = (self.state or {}).get("pass")
        if stored is None or stored["index"] != index:
            return EpochPass(index, batches, generator)
        generator.set_state(stored["generator"])
        return EpochPass(index, batches, generator, stored["next"], stored["total"], stored["seen"], stored["skipped"])

    def optimizer_step(self, optimizer: torch.optim.Optimizer, objective: torch.Tensor, step: int) -> bool:
        """One update, or none: a non-finite objective or gradient norm skips the step (the
        weights and the optimizer state stay as they were) and returns False. Otherwise the
        gradient norm is clipped at ``grad_clip`` and the learning rate is warmed up linearly
        over ``warmup_steps`` and scaled by ``lr_scale``."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        optimizer.zero_grad(set_to_none=True)
        finite = torch.isfinite(objective)
        if finite:  # backward through a NaN loss is wasted work
            objective.backward()
            if self.cfg.grad_clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            finite = torch.isfinite(norm)
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            return False
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])  # kept in the optimizer's state_dict
            warmup = min(1.0, (step + 1) / self.cfg.warmup_steps) if self.cfg.warmup_steps else 1.0
            group["lr"] = group["base_lr"] * warmup * self.lr_scale
        optimizer.step()
        return True

    def run_epoch(self, optimizer, epoch: EpochPass, loss_fn, *, step: int, desc: str, postfix, fields) -> tuple[float, int, int]:
        """Trains on the rest of ``epoch`` with a progress bar; stops early when out of budget.

        Args:
            loss_fn: ``(idx, generator) -> (loss, objective)``; ``objective`` (the loss plus any
                penalty) is minimised and ``loss`` is averaged for the log.
            postfix: mean loss so far -> the text shown beside the bar.
            fields: ``step -> dict`` of the loop's own checkpoint fields, for the mid-epoch
                checkpoints written every ``checkpoint_every`` steps.

        Returns:
            (mean loss over the pass, items trained on in this call, steps taken so far in the run).

        Raises:
            NumericalFault: ``max_bad_steps`` steps in a row were skipped as non-finite.
        """
        seen_before = epoch.seen
        bar = tqdm(total=len(epoch.batches), initial=epoch.next, desc=desc, disable=not self.progress, leave=False)
        try:
            while not epoch.complete and not self.out_of_budget(step):
                idx = epoch.batches[epoch.next]
                loss, objective = loss_fn(idx, epoch.generator)
                good = self.optimizer_step(optimizer, objective, step)
                step, epoch.next = step + 1, epoch.next + 1
                bar.update()
                if good:
                    self.bad_streak = 0
                    epoch.total, epoch.seen = epoch.total + loss.item() * len(idx), epoch.seen + len(idx)
                else:
                    epoch.skipped += 1
                    self.bad_streak += 1
                    self.report(f"step {step}: non-finite loss or gradient, step skipped")
                    if self.bad_streak >= self.cfg.max_bad_steps:
                        raise NumericalFault(step, self.bad_streak, self._locate_fault(loss_fn, idx, epoch.generator))
                if epoch.next % 10 == 1 and epoch.seen:
                    bar.set_postfix_str(postfix(epoch.total / epoch.seen))
                every = self.cfg.checkpoint_every
                if every and step % every == 0 and not epoch.complete and self.bad_streak == 0:
                    self.save({**fields(step), **epoch.position()}, improved=False)
        finally:
            bar.close()
        return epoch.total / max(epoch.seen, 1), epoch.seen - seen_before, step

    def _locate_fault(self, loss_fn, idx, generator) -> str:
        """Re-runs a failing batch with hooks on every flow layer to name where it went wrong."""
        # The hooks must see every layer: run eagerly even if the loss was compiled.
        with torch.compiler.set_stance("force_eager"), _non_finite_trace(self.model) as found:
            loss, objective = loss_fn(idx, generator)
        if found:
            return f"the first non-finite value was the {found[0]}"
        if not torch.isfinite(objective):
            return "every layer was finite; the prior or the penalty term was not"
        self.model.zero_grad(set_to_none=True)
        objective.backward()
        names = [name for name, p in self.model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        self.model.zero_grad(set_to_none=True)
        if names:
            return f"the forward pass was finite; the gradient of {names[0]} was not"
        return "the fault did not recur when the batch was re-run"

    def roll_back(self, fault: NumericalFault) -> None:
        """After a `NumericalFault`: continue from ``last.pt`` with the learning rate scaled by
        ``rollback_lr_factor``, at most ``max_rollbacks`` times; then raise `TrainingError`."""
        last = self.out / "last.pt"
        if self.rollbacks >= self.cfg.max_rollbacks or not last.is_file():
            raise TrainingError(
                f"training diverged: {fault} (after {self.rollbacks} rollback(s) with a lower learning rate); "
                f"the last good state is in {last}"
            )
        self.state = checkpoint.load(last)
        self.model.load_state_dict(self.state["model_state"])
        set_rng_states(self.state["rng"])
        self.rollbacks += 1
        self.lr_scale = self.state.get("lr_scale", 1.0) * self.cfg.rollback_lr_factor
        self.bad_streak = 0
        self.report(f"{fault}; rolled back to step {self.state['step']} with the learning rate x{self.lr_scale:g}")

    def log(self, record: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({**record, "elapsed": self.elapsed()}) + "\n")

    def forget_log_after(self, step: int) -> None:
        """Drops metrics lines past ``step`` (written after the checkpoint a run resumes from)."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        lines = path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        if len(kept) != len(lines):
            tmp = path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)

    def save(self, fields: dict, improved: bool) -> None:
        """Writes last.pt (and best.pt when ``improved``) from the run, the model and ``fields``."""
        payload = {
            **{k: self.run[k] for k in ("model", "size", "model_config", "train", "hardware")},
            "model_state": self.model.state_dict(),
            "rng": rng_states(),
            "elapsed": self.elapsed(),
            "lr_scale": self.lr_scale,
            "rollbacks": self.rollbacks,
            "pass": None,  # overwritten by a pass's position when it stops mid-epoch
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
