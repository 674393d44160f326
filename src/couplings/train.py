"""The training loop: maximum likelihood on dequantized images, checkpointed every epoch."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from couplings import checkpoint, data
from couplings.config import ConfigError, apply_overrides
from couplings.evaluate import bits_per_dim, dequantize, nats_to_bits_per_dim
from couplings.hardware import describe, resolve_device
from couplings.models import MODELS
from couplings.session import NumericalFault, Session, StoppedBySignal, TrainingError, set_rng_states
from couplings.train_latent import fit_latent

__all__ = ["StoppedBySignal", "TrainingError", "fit_flow", "train"]

# Options that may change when a run is resumed; the rest define the run and stay fixed.
RESUMABLE_OPTIONS = ("epochs", "max_steps", "max_minutes", "target_bpd", "checkpoint_every", "max_bad_steps", "max_rollbacks",
                     "rollback_lr_factor", "compile", "precision", "channels_last", "adam")


def _new_run(model_name: str, out: Path, size: str | None, model_overrides: dict, train_overrides: dict) -> dict:
    entry = MODELS[model_name]
    train_config = apply_overrides(entry.train_config(), train_overrides)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TrainingError(f"{out} already exists and is not empty; pass --resume to continue it or choose another --out")
    size = size or next(iter(entry.presets))  # the first preset is the paper's size
    if size not in entry.presets:
        raise ConfigError(f"size must be one of {sorted(entry.presets)} for {model_name}, found {size!r}")
    model_config = apply_overrides(entry.config(), {**entry.presets[size], **model_overrides})
    return {"model": model_name, "size": size, "model_config": asdict(model_config), "train": asdict(train_config)}


def _resumed_run(out: Path, size: str | None, model_overrides: dict, train_overrides: dict) -> tuple[dict, dict]:
    if not (out / "last.pt").is_file():
        raise TrainingError(f"cannot resume: {out / 'last.pt'} does not exist")
    state = checkpoint.load(out / "last.pt")
    stored_train = MODELS[state["model"]].train_config(**_tuples(state["train"]))
    changed = [k for k, v in model_overrides.items() if state["model_config"].get(k) != v]
    changed += [k for k, v in train_overrides.items() if k not in RESUMABLE_OPTIONS and getattr(stored_train, k) != v]
    if size is not None and size != state["size"]:
        changed.insert(0, "size")
    if changed:
        raise ConfigError(
            f"cannot change {', '.join(changed)} when resuming; only {', '.join(RESUMABLE_OPTIONS)} may change"
        )
    # A time budget belongs to one invocation: a resumed run has none unless given again.
    resumable = {"max_minutes": None, **{k: v for k, v in train_overrides.items() if k in RESUMABLE_OPTIONS}}
    run = {k: state[k] for k in ("model", "size", "model_config")}
    run["train"] = asdict(apply_overrides(stored_train, resumable))
    return run, state


def _tuples(d: dict) -> dict:
    """JSON and checkpoints store tuples as lists; dataclass fields want tuples back."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def train(
    model_name: str,
    out: str | os.PathLike,
    *,
    train_overrides: dict[str, Any] | None = None,
    model_overrides: dict[str, Any] | None = None,
    size: str | None = None,
    device: str = "auto",
    resume: bool = False,
    data_root=None,
    progress: bool = True,
) -> Path:
    """Trains ``model_name`` into run directory ``out`` and returns ``out``.

    The run directory holds ``config.json``, ``last.pt`` and ``best.pt`` (model, optimizer,
    epoch, step, position inside the epoch, every RNG state; ``best.pt`` has the best
    validation score so far), ``metrics.jsonl`` (a line per epoch) and ``samples/epoch_NNNN.png``.
    ``last.pt`` is written at step 0, after every epoch and every ``checkpoint_every`` steps;
    ``resume=True`` continues from it exactly, mid-epoch included.

    Training stops after ``epochs`` epochs, or earlier at ``max_steps`` optimizer steps or
    ``max_minutes`` of wall-clock; a stopped epoch is validated and checkpointed like a full one.
    SIGINT and SIGTERM stop it the same way and then raise `StoppedBySignal`.

    A step whose loss or gradient is not finite is skipped; after ``max_bad_steps`` in a row,
    training rolls back to ``last.pt`` with the learning rate times ``rollback_lr_factor``
    (at most ``max_rollbacks`` times) and then raises `TrainingError` naming the step and layer.
    """
    if model_name not in MODELS:
        raise ConfigError(f"unknown model {model_name!r}; expected one of {sorted(MODELS)}")
    out = Path(out)
    train_overrides, model_overrides = dict(train_overrides or {}), dict(model_overrides or {})
    if resume:
        run, state = _resumed_run(out, size, model_overrides, train_overrides)
    else:
        run, state = _new_run(model_name, out, size, model_overrides, train_overrides), None
    if run["model"] != model_name:
        raise TrainingError(f"{out} holds a {run['model']!r} run, not {model_name!r}")
    cfg = MODELS[model_name].train_config(**_tuples(run["train"]))
    dev = resolve_device(device)

    train_data = data.load_split(cfg.dataset, "train", cfg.val_size, data_root)
    val_data = data.load_split(cfg.dataset, "val", cfg.val_size, data_root)
    image_shape = (1, *train_data[0].shape[1:])
    torch.manual_seed(cfg.seed)
    model = checkpoint.build_model(model_name, run["model_config"])
    if math.prod(model.event_shape) != math.prod(image_shape):
        raise ConfigError(f"{model_name} models images of shape {model.event_shape}, but {cfg.dataset} images have shape {image_shape}")
    model.to(dev)
    if state is not None:
        model.load_state_dict(state["model_state"])
        if "rng" in state:
            set_rng_states(state["rng"])
        else:  # format 1 kept torch's CPU state only
            torch.set_rng_state(state["rng_state"])
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / "samples").mkdir(exist_ok=True)
    run["hardware"] = describe(dev)
    (out / "config.json").write_text(json.dumps(run, indent=2) + "\n")
    session = Session(out, run, cfg, model, dev, state, train_data, val_data, progress)
    if state is not None:
        session.started -= state["elapsed"]
        session.lr_scale, session.rollbacks = state.get("lr_scale", 1.0), state.get("rollbacks", 0)
        session.forget_log_after(state["step"])
    else:
        session.save({"epoch": 0, "step": 0}, improved=False)  # something to resume or roll back to at once
    fit = TRAINERS.get(model_name, fit_flow)
    with session.stop_on_signals():
        while True:
            try:
                fit(session)
                break
            except NumericalFault as fault:
                session.roll_back(fault)  # continues from last.pt with a lower learning rate, or raises
    return out


def fit_flow(session: Session) -> None:
    """Maximum likelihood on dequantized pixels, validated in bits/dim after every epoch.

    A checkpoint's ``epoch`` counts completed epochs; one that stopped inside an epoch also
    holds that pass's position, and the next start continues it from the next batch.
    """
    model, cfg, dev, state = session.model, session.cfg, session.device, session.state or {}
    optimizer = make_adam(model.parameters(), cfg, cfg.lr)
    if "optimizer_state" in state:
        optimizer.load_state_dict(state["optimizer_state"])
    epoch, step, best = state.get("epoch", 0), state.get("step", 0), state.get("best_val_bpd", math.inf)
    # Weight-norm scales ("g"), the only weights Real NVP's L2 penalty applies to.
    wn_scales = [p for name, p in model.named_parameters() if name.endswith("parametrizations.weight.original0")]
    wn_scales = wn_scales if cfg.wn_l2 > 0 else []
    pixels = torch.as_tensor(session.train_data[0]).unsqueeze(1).to(dev)  # (N, H, W) -> (N, 1, H, W)
    dim = math.prod(pixels.shape[1:])

    nll = training_nll(model, cfg, dev)

    def loss_fn(idx, generator):
        loss = nll(dequantize(pixels[idx], generator))
        penalty = cfg.wn_l2 * sum(g.square().sum() for g in wn_scales) if wn_scales else 0.0
        return loss, loss + penalty

    def fields(step):
        return {"optimizer_state": optimizer.state_dict(), "epoch": epoch, "step": step, "best_val_bpd": best}

    while epoch < cfg.epochs and not session.out_of_budget(step):
        model.train()
        this = session.start_pass(len(pixels), epoch + 1)
        epoch_start = time.perf_counter()
        train_nll, seen, step = session.run_epoch(
            optimizer, this, loss_fn, step=step, desc=f"epoch {epoch + 1}/{cfg.epochs}",
            postfix=lambda nll: f"bpd={nats_to_bits_per_dim(-nll, dim):.3f}", fields=fields)
        seconds = time.perf_counter() - epoch_start
        epoch += this.complete
        val_bpd = bits_per_dim(model, session.val_data[0], batch_size=cfg.eval_batch_size, seed=cfg.seed)
        improved = val_bpd < best
        best = min(best, val_bpd)
        session.log({
            "epoch": this.index,
            "step": step,
            "partial_epoch": not this.complete,
            "train_loss": train_nll,
            "train_bpd": nats_to_bits_per_dim(-train_nll, dim),
            "val_bpd": val_bpd,
            "seconds": seconds,
            "images_per_s": seen / seconds if seconds > 0 else None,
            "skipped_steps": this.skipped,
            "rollbacks": session.rollbacks,
            "lr_scale": session.lr_scale,
        })
        model.eval()
        session.save_samples(model.sample(cfg.samples_per_epoch), this.index)
        session.save({**fields(step), **({} if this.complete else this.position())}, improved)
        session.report(
            f"epoch {this.index}: train {nats_to_bits_per_dim(-train_nll, dim):.4f} bpd, "
            f"val {val_bpd:.4f} bpd{' (best)' if improved else ''}, {seen / seconds:.0f} images/s, {seconds:.1f} s"
        )
        if cfg.target_bpd is not None and val_bpd <= cfg.target_bpd:
            session.report(f"reached the target {cfg.target_bpd} bits/dim after {session.elapsed() / 60:.1f} min")
            break


# The ``adam`` option's explicit choices -> torch.optim.Adam keyword arguments.
ADAM_KERNELS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def make_adam(params, cfg, lr: float) -> torch.optim.Adam:
    """Adam with the run's betas, eps and weight decay, and its ``adam`` implementation ("auto":
    the fused kernel where this PyTorch has one for the parameters' device, else the default)."""
    params = list(params)
    options = {"lr": lr, "betas": cfg.betas, "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    if cfg.adam == "auto":
        try:
            return torch.optim.Adam(params, fused=True, **options)
        except RuntimeError:  # e.g. an older PyTorch without a fused CPU Adam
            return torch.optim.Adam(params, **options)
    return torch.optim.Adam(params, **options, **ADAM_KERNELS[cfg.adam])


def training_nll(model, cfg, device: torch.device):
    """``x -> -mean log p(x)`` over a batch of dequantized images, with the run's fast paths:
    channels-last inputs (and model), bf16 autocast (the loss comes back float32), torch.compile.
    """
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)

    def nll(x):
        return -model.log_prob(x).mean()

    compiled = torch.compile(nll) if cfg.compile else nll

    def loss(x):
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            return compiled(x).float()
    return loss


# Models whose training is not plain maximum likelihood on pixels.
TRAINERS = {"latent-realnvp": fit_latent}
