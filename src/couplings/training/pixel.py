"""The pixel-space trainer (NICE, Real NVP, Glow): maximum likelihood on dequantized images,
validated in bits/dim after every epoch."""

from __future__ import annotations

import math
import time

import torch

from couplings.config import PixelTrainConfig
from couplings.likelihood import bits_per_dim, dequantize, nats_to_bits_per_dim
from couplings.training.loop import Context, start_pass, train_pass
from couplings.training.optim import make_adam

__all__ = ["fit", "training_nll"]


def fit(ctx: Context) -> None:
    """Trains until ``epochs`` epochs are done, the budget is spent or ``target_bpd`` is reached.

    A checkpoint's ``epoch`` counts completed epochs; one that stopped inside an epoch also
    holds that pass's position, and the next start continues it from the next batch. A stopped
    epoch is validated, logged and checkpointed like a full one.
    """
    model, cfg, state = ctx.model, ctx.cfg, ctx.state or {}
    optimizer = make_adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                          weight_decay=cfg.weight_decay, kernel=cfg.adam)
    if "optimizer_state" in state:
        optimizer.load_state_dict(state["optimizer_state"])
    epoch, step, best = state.get("epoch", 0), state.get("step", 0), state.get("best_val_bpd", math.inf)
    # Weight-norm scales ("g"), the only weights Real NVP's L2 penalty applies to.
    wn_scales = [p for name, p in model.named_parameters() if name.endswith("parametrizations.weight.original0")]
    wn_scales = wn_scales if cfg.wn_l2 > 0 else []
    pixels = torch.as_tensor(ctx.train_data[0]).unsqueeze(1).to(ctx.device)  # (N, H, W) -> (N, 1, H, W)
    dim = math.prod(pixels.shape[1:])
    nll = training_nll(model, cfg, ctx.device)

    def objective(idx, generator):
        loss = nll(dequantize(pixels[idx], generator))
        penalty = cfg.wn_l2 * sum(g.square().sum() for g in wn_scales) if wn_scales else 0.0
        return loss, loss + penalty

    def fields(step):
        return {"optimizer_state": optimizer.state_dict(), "epoch": epoch, "step": step, "best_val_bpd": best}

    while epoch < cfg.epochs and not ctx.budget.spent(step):
        model.train()
        this = start_pass(len(pixels), epoch + 1, cfg, ctx.device, ctx.state)
        seen_before, started = this.seen, time.perf_counter()
        step = train_pass(ctx, optimizer, this, objective, step=step, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                          postfix=lambda nll: f"bpd={nats_to_bits_per_dim(-nll, dim):.3f}", fields=fields)
        seconds, seen = time.perf_counter() - started, this.seen - seen_before
        epoch += this.complete
        train_bpd = nats_to_bits_per_dim(-this.mean_loss(), dim)
        val_bpd = bits_per_dim(model, ctx.val_data[0], batch_size=cfg.eval_batch_size, seed=cfg.seed)
        improved = val_bpd < best
        best = min(best, val_bpd)
        ctx.log({
            "epoch": this.index,
            "step": step,
            "partial_epoch": not this.complete,
            "train_loss": this.mean_loss(),
            "train_bpd": train_bpd,
            "val_bpd": val_bpd,
            "seconds": seconds,
            "images_per_s": seen / seconds if seconds > 0 else None,
            "skipped_steps": this.skipped,
            "rollbacks": ctx.faults.rollbacks,
            "lr_scale": ctx.faults.lr_scale,
        })
        model.eval()
        ctx.run_dir.save_samples(model.sample(cfg.samples_per_epoch), this.index)
        ctx.checkpoint({**fields(step), **({} if this.complete else this.position())}, best=improved)
        ctx.console.say(
            f"epoch {this.index}: train {train_bpd:.4f} bpd, val {val_bpd:.4f} bpd{' (best)' if improved else ''}, "
            f"{seen / seconds:.0f} images/s, {seconds:.1f} s"
        )
        if cfg.target_bpd is not None and val_bpd <= cfg.target_bpd:
            ctx.console.say(f"reached the target {cfg.target_bpd} bits/dim after {ctx.budget.elapsed() / 60:.1f} min")
            break


def training_nll(model, cfg: PixelTrainConfig, device: torch.device):
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
