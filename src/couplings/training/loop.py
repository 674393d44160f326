"""The training loop: `run_stage` trains one `Stage` (the pixel trainer has one, the latent
trainer two) pass by pass, validating, sampling and checkpointing after each; `train_pass`, where
one training step reads top to bottom; the state they advance (`TrainState`); and the parts they
share: passes over the data, the budget and signals, the console."""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from couplings import distributed
from couplings.checkpoint import Checkpoint
from couplings.config import ConfigError, TrainConfig
from couplings.images import grid
from couplings.rundir import RunDir
from couplings.tensorboard import TensorBoard
from couplings.training.errors import StoppedBySignal, TrainingError
from couplings.training.faults import FaultCounter, locate_fault, rng_states
from couplings.training.optim import EMA, lr_factor, optimizer_step

__all__ = ["Budget", "Console", "Context", "EpochPass", "Stage", "TrainState", "run_stage", "start_pass", "train_pass"]


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

    def mean_loss(self) -> float:
        return self.total / max(self.seen, 1)

    def position(self) -> dict:
        """What a checkpoint keeps (`Checkpoint.position`) to let `start_pass` continue this pass exactly."""
        return {"index": self.index, "next": self.next, "total": self.total, "seen": self.seen,
                "skipped": self.skipped, "generator": self.generator.get_state()}


def start_pass(n: int, index: int, cfg: TrainConfig, device: torch.device, state: Checkpoint | None) -> EpochPass:
    """Pass ``index`` over ``n`` examples in full batches of a permutation drawn from (seed, index)
    alone, so that a resumed run draws exactly what an uninterrupted one would (the ragged last
    batch is dropped; with ``cfg.shuffle`` off, the batches follow the stored order). If
    checkpoint ``state`` stopped inside this pass, it continues from the next batch with the same
    noise generator state."""
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 100_003 + index)
    order = torch.randperm(n, generator=generator, device=device) if cfg.shuffle else torch.arange(n, device=device)
    count = n // cfg.batch_size
    if count == 0:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {n} training examples")
    batches = [order[i * cfg.batch_size : (i + 1) * cfg.batch_size] for i in range(count)]
    stored = None if state is None else state.position
    if stored is None or stored["index"] != index:
        return EpochPass(index, batches, generator)
    generator.set_state(stored["generator"])
    return EpochPass(index, batches, generator, stored["next"], stored["total"], stored["seen"], stored["skipped"])


@dataclass
class Budget:
    """The run's clock and when to stop: ``max_steps``, ``max_minutes`` of this invocation, or a signal."""

    max_steps: int | None
    max_minutes: float | None
    already: float = 0.0  # seconds trained by earlier invocations of a resumed run
    started: float = field(default_factory=time.perf_counter)
    stop_signal: int | None = None  # set by SIGINT/SIGTERM: stop after the current step

    def elapsed(self) -> float:
        """Seconds of the whole run, earlier invocations included."""
        return self.already + time.perf_counter() - self.started

    def spent(self, step: int) -> bool:
        """Whether to stop now. Under torchrun the clock and the signals are agreed over the
        ranks, so that every rank stops after the same step."""
        over_steps = self.max_steps is not None and step >= self.max_steps
        over_time = self.max_minutes is not None and time.perf_counter() - self.started >= 60 * self.max_minutes
        over_time, signum = distributed.max_over_ranks(float(over_time), float(self.stop_signal or 0))
        if signum and self.stop_signal is None:
            self.stop_signal = int(signum)
        return over_steps or bool(over_time) or self.stop_signal is not None

    @contextmanager
    def stop_on_signals(self, run_dir: RunDir, console: Console) -> Iterator[None]:
        """While active, SIGINT and SIGTERM end training like a spent budget: the current step
        finishes, the (partial) epoch is validated and checkpointed, and `StoppedBySignal` is
        raised on exit. A second signal interrupts at once, except under torchrun: its agent passes
        signals on to the workers and kills them 30 s later if they have not exited, and every
        rank must stop after the same step."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self.stop_signal is not None:
                if distributed.launched():
                    return
                raise KeyboardInterrupt
            self.stop_signal = signum
            again = "" if distributed.launched() else " (again to abort)"
            console.say(f"{signal.Signals(signum).name}: stopping after the current step{again}")

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        if self.stop_signal is not None:
            name = signal.Signals(self.stop_signal).name
            saved = (f"the run is checkpointed in {run_dir.last} (continue with --resume)"
                     if run_dir.last.is_file() else "no checkpoint had been written yet")
            raise StoppedBySignal(f"stopped by {name}; {saved}", self.stop_signal)


@dataclass
class Console:
    """Progress bars and one-line reports, or silence (``progress=False``)."""

    progress: bool = True

    def say(self, text: str) -> None:
        if self.progress:
            tqdm.write(text)

    def bar(self, total: int, initial: int, desc: str) -> tqdm:
        return tqdm(total=total, initial=initial, desc=desc, disable=not self.progress, leave=False)


Objective = Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TrainState:
    """How far training got: what `run_stage` and `train_pass` advance and every checkpoint keeps."""

    epoch: int = 0  # completed passes of the current stage
    step: int = 0  # optimizer steps of the whole run
    best: float = math.inf  # the lowest validation score of the run so far

    @classmethod
    def of(cls, ckpt: Checkpoint | None, best: float | None) -> TrainState:
        """The state a checkpoint stopped at (a fresh one for None), with the score it keeps as ``best``."""
        if ckpt is None:
            return cls()
        return cls(ckpt.epoch, ckpt.step, math.inf if best is None else best)


@dataclass
class Stage:
    """One stage of a trainer: what to minimise, how to check it, and what to keep of it.

    `run_stage` trains it for ``epochs`` passes over ``examples`` training examples, in the
    model's training mode (``model`` is the part being trained); after each pass it calls
    ``validate`` (the log's validation fields; the one named ``score`` is tracked as the run's
    best, lower is better) and ``sample`` (a grid for ``samples/``) in eval mode, under the
    Polyak averages when ``ema`` is kept.
    """

    name: str  # the progress bar's word: "epoch", "autoencoder", "flow"
    model: nn.Module
    optimizer: torch.optim.Optimizer
    objective: Objective
    epochs: int
    examples: int
    validate: Callable[[], dict[str, float]]
    sample: Callable[[], torch.Tensor]
    train_fields: Callable[[float], dict[str, float]]  # mean objective -> the log's training fields besides it
    fields: Callable[[TrainState], dict[str, Any]]  # -> the trainer's own `Checkpoint` fields
    score: str | None = None  # the key of `validate`'s result that makes best.pt; None: none does
    ema: EMA | None = None
    schedule: Callable[[int], float] | None = None  # step -> learning-rate factor; default: the run's (`lr_factor`)
    passes_before: int = 0  # passes of earlier stages (a pass's index counts across stages)
    log_fields: dict[str, Any] = field(default_factory=dict)  # written first in each of its log lines
    sample_rows: int = 8
    done: Callable[[dict[str, float]], bool] = lambda scores: False  # stop after a pass with these scores


@dataclass
class Context:
    """What a trainer (`couplings.training.pixel`, `couplings.training.latent`) is given: the
    model and data, the checkpoint it starts from, and one small object per concern."""

    run: dict[str, Any]  # model, size, model_config, train, hardware: stored in every checkpoint
    cfg: TrainConfig
    model: nn.Module
    device: torch.device
    train_data: tuple[np.ndarray, np.ndarray]
    val_data: tuple[np.ndarray, np.ndarray]
    state: Checkpoint | None  # the checkpoint to start from (resumed or rolled back to), if any
    run_dir: RunDir
    budget: Budget
    faults: FaultCounter
    console: Console
    tensorboard: TensorBoard | None = None  # rank 0 of a run trained with --tensorboard

    def snapshot(self, state: TrainState, stage: Stage | None = None, this: EpochPass | None = None) -> Checkpoint:
        """The run as a `Checkpoint`: what it is, the model, every random state, the clock, the
        fault counters, ``state``, the stage's optimizer and averages, and the position inside
        pass ``this`` if it stopped before its end."""
        ckpt = Checkpoint(
            **{k: self.run[k] for k in ("model", "size", "model_config", "train", "hardware")},
            model_state=self.model.state_dict(),
            epoch=state.epoch,
            step=state.step,
            elapsed=self.budget.elapsed(),
            rng=rng_states(),
            position=None if this is None or this.complete else this.position(),
            lr_scale=self.faults.lr_scale,
            rollbacks=self.faults.rollbacks,
            world_size=distributed.world_size(),
        )
        if stage is not None:
            ckpt.optimizer_state = stage.optimizer.state_dict()
            ckpt.ema_state = None if stage.ema is None else stage.ema.state_dict()
            for name, value in stage.fields(state).items():
                setattr(ckpt, name, value)
        return ckpt

    def checkpoint(self, state: TrainState, stage: Stage | None = None, this: EpochPass | None = None, *,
                   best: bool = False) -> None:
        """Writes `snapshot` as ``last.pt`` (and ``best.pt`` when ``best``). Under torchrun,
        rank 0 writes it, after checking that every rank holds the same weights."""
        if not distributed.in_sync(self.model):
            raise TrainingError(f"the {distributed.world_size()} processes no longer hold the same weights; "
                                "this is a bug in couplings, please report it")
        self.run_dir.save_checkpoint(self.snapshot(state, stage, this), best=best)

    def log(self, record: dict) -> None:
        """Appends an epoch's line to ``metrics.jsonl``, with the run's elapsed seconds (and
        logs its numbers to TensorBoard)."""
        record = {**record, "elapsed": self.budget.elapsed()}
        self.run_dir.append_metrics(record)
        if self.tensorboard is not None:
            self.tensorboard.epoch(record)

    def save_samples(self, images: torch.Tensor, index: int, step: int, nrow: int = 8) -> None:
        """Writes ``samples/epoch_NNNN.png`` (and the grid to TensorBoard) for pass ``index``."""
        self.run_dir.save_samples(images, index, nrow=nrow)
        if self.tensorboard is not None:
            picture = torch.from_numpy(grid(images, nrow)).float() / 255
            self.tensorboard.samples(picture.unsqueeze(0) if picture.dim() == 2 else picture.permute(2, 0, 1), step)


def run_stage(ctx: Context, stage: Stage, state: TrainState) -> TrainState:
    """Trains ``stage`` from ``state`` until its ``epochs`` passes are done, the budget is spent
    or ``stage.done``; returns the state it got to.

    A pass continues from the checkpoint's position if the checkpoint stopped inside it. Each
    pass, whole or stopped, is validated, logged (``metrics.jsonl``), sampled and checkpointed
    (as ``best.pt`` too when its score is the best so far).
    """
    while state.epoch < stage.epochs and not ctx.budget.spent(state.step):
        stage.model.train()
        this = start_pass(stage.examples, stage.passes_before + state.epoch + 1, ctx.cfg, ctx.device, ctx.state)
        seen_before, started = this.seen, time.perf_counter()
        train_pass(ctx, stage, this, state)
        seconds, seen = time.perf_counter() - started, this.seen - seen_before
        state.epoch += this.complete
        ctx.model.eval()
        with stage.ema.applied(ctx.model) if stage.ema is not None else nullcontext():
            scores = stage.validate()
            samples = stage.sample()
        score = scores[stage.score] if stage.score else math.inf
        improved = score < state.best
        state.best = min(state.best, score)
        train = stage.train_fields(this.mean_loss())
        ctx.log({**stage.log_fields, "epoch": this.index - stage.passes_before, "step": state.step,
                 "partial_epoch": not this.complete, "train_loss": this.mean_loss(), **train, **scores, "seconds": seconds,
                 "images_per_s": seen / seconds if seconds > 0 else None, "skipped_steps": this.skipped,
                 "rollbacks": ctx.faults.rollbacks, "lr_scale": ctx.faults.lr_scale})
        ctx.save_samples(samples, this.index, state.step, nrow=stage.sample_rows)
        ctx.checkpoint(state, stage, this, best=improved)
        numbers = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in {**train, **scores}.items())
        ctx.console.say(f"{stage.name} {this.index - stage.passes_before}: {numbers}{' (best)' if improved else ''}, "
                        f"{seen / seconds if seconds > 0 else 0:.0f} images/s, {seconds:.1f} s")
        if stage.done(scores):
            break
    return state


def train_pass(ctx: Context, stage: Stage, this: EpochPass, state: TrainState,
               postfix: Callable[[float], str] | None = None) -> None:
    """Trains ``stage`` on the rest of pass ``this`` until it ends or the budget is spent,
    advancing ``state.step``; checkpoints every ``checkpoint_every`` steps inside the pass.

    ``stage.objective`` is ``(batch indices, noise generator) -> (loss, loss plus any penalty)``;
    the second is minimised, the first averaged for the log. The indices are the global batch;
    under torchrun each rank's objective takes its share (`couplings.distributed.shard`) of them
    and of any noise drawn for the whole batch. ``postfix`` (mean loss -> text) is shown beside
    the progress bar; by default the stage's training fields.

    Raises:
        NumericalFault: ``max_bad_steps`` steps in a row were skipped as non-finite.
    """
    cfg, step = ctx.cfg, state.step
    postfix = postfix or (lambda mean: ", ".join(f"{k.split('_')[-1]}={v:.3f}" for k, v in stage.train_fields(mean).items()))
    desc = f"{stage.name} {this.index - stage.passes_before}/{stage.epochs}"
    with ctx.console.bar(len(this.batches), this.next, desc) as bar:
        while not this.complete and not ctx.budget.spent(step):
            idx = this.batches[this.next]
            loss, total = stage.objective(idx, this.generator)
            factor = (stage.schedule(step) if stage.schedule else lr_factor(cfg, step, len(this.batches))) * ctx.faults.lr_scale
            grad_norm = optimizer_step(stage.optimizer, total, grad_clip=cfg.grad_clip, lr_factor=factor)
            good = grad_norm is not None
            distributed.broadcast_buffers(ctx.model)  # batch-norm running averages: rank 0's
            step, this.next = step + 1, this.next + 1
            state.step = step
            bar.update()
            if good:
                if stage.ema is not None:
                    stage.ema.update(ctx.model, step)
                value = distributed.average(loss)  # the global batch's mean
                this.total, this.seen = this.total + value * len(idx), this.seen + len(idx)
                if ctx.tensorboard is not None:
                    ctx.tensorboard.step(step, value, stage.optimizer.param_groups[0]["lr"], grad_norm)
            else:
                this.skipped += 1
                ctx.console.say(f"step {step}: non-finite loss or gradient, step skipped")
            ctx.faults.count(good, step, lambda: locate_fault(ctx.model, lambda: stage.objective(idx, this.generator)[1]))
            if this.next % 10 == 1 and this.seen:
                bar.set_postfix_str(postfix(this.mean_loss()))
            every = cfg.checkpoint_every
            if every and step % every == 0 and not this.complete and ctx.faults.bad_streak == 0:
                ctx.checkpoint(state, stage, this)
