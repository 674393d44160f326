"""The latent trainer (`LatentRealNVP`): the autoencoder, then the flow on frozen embeddings."""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from couplings.distributed import shard
from couplings.models import LatentRealNVP
from couplings.training.errors import TrainingError
from couplings.training.loop import Context, start_pass, train_pass
from couplings.training.optim import lr_factor, make_adam

__all__ = ["fit"]


def _to_unit(pixels) -> Tensor:
    return torch.as_tensor(pixels).unsqueeze(1).float() / 255  # (N, H, W) uint8 -> (N, 1, H, W) in [0, 1]


@torch.no_grad()
def _encode(model: LatentRealNVP, images: Tensor, batch: int = 1000) -> Tensor:
    model.autoencoder.eval()
    return torch.cat([model.autoencoder.encode(images[i : i + batch]) for i in range(0, len(images), batch)])


@torch.no_grad()
def _mean_over(fn, n: int, batch: int = 1000) -> float:
    """Mean of a per-batch mean ``fn(start, stop)`` over n items, weighted by batch size."""
    return sum(float(fn(i, min(i + batch, n))) * (min(i + batch, n) - i) for i in range(0, n, batch)) / n


def fit(ctx: Context) -> None:
    """Stage 1: the autoencoder for ``ae_epochs`` (binary cross-entropy, Adam ``ae_lr``).
    Stage 2: the flow on the frozen encoder's embeddings for ``epochs`` (negative log-likelihood
    of the embedding given its label, Adam ``lr``); ``best.pt`` has the lowest validation NLL.
    Each stage's learning-rate schedule counts its own steps.
    Both stages checkpoint every epoch (and every ``checkpoint_every`` steps) and resume
    exactly where they stopped."""
    model: LatentRealNVP = ctx.model
    cfg, dev, state = ctx.cfg, ctx.device, ctx.state or {}
    conditional = model.conditional
    stage, ae_epoch = state.get("stage", "autoencoder"), state.get("ae_epoch", 0)
    epoch, step, best = state.get("epoch", 0), state.get("step", 0), state.get("best_val_nll", math.inf)
    images, val_images = _to_unit(ctx.train_data[0]).to(dev), _to_unit(ctx.val_data[0]).to(dev)
    labels = torch.as_tensor(ctx.train_data[1]).long().to(dev)
    val_labels = torch.as_tensor(ctx.val_data[1]).long().to(dev)

    ae = model.autoencoder
    steps_per_epoch = len(images) // cfg.batch_size  # full batches (`start_pass`)
    ae_steps = cfg.ae_epochs * steps_per_epoch

    def ae_schedule(step: int) -> float:
        if cfg.ae_lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, step / ae_steps)))
        return 1.0

    # The seed project's autoencoder optimizer: Adam's own betas and eps, not the flow's.
    ae_optimizer = make_adam(ae.parameters(), lr=cfg.ae_lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    if stage == "autoencoder" and "optimizer_state" in state:
        ae_optimizer.load_state_dict(state["optimizer_state"])

    def ae_fields(step):
        return {"stage": "autoencoder", "ae_epoch": ae_epoch, "epoch": 0, "step": step, "best_val_nll": best,
                "optimizer_state": ae_optimizer.state_dict()}

    while stage == "autoencoder" and ae_epoch < cfg.ae_epochs and not ctx.budget.spent(step):
        ae.train()
        this = start_pass(len(images), ae_epoch + 1, cfg, dev, ctx.state)
        seen_before, started = this.seen, time.perf_counter()
        step = train_pass(ctx, ae_optimizer, this, lambda idx, _: (ae.loss(images[shard(idx)]),) * 2, step=step,
                          desc=f"autoencoder {ae_epoch + 1}/{cfg.ae_epochs}", postfix=lambda bce: f"BCE={bce:.2f}",
                          fields=ae_fields, schedule=ae_schedule)
        seconds, seen, train_bce = time.perf_counter() - started, this.seen - seen_before, this.mean_loss()
        ae_epoch += this.complete
        ae.eval()
        val_bce = _mean_over(lambda a, b: ae.loss(val_images[a:b]), len(val_images))
        ctx.log({"stage": "autoencoder", "epoch": this.index, "step": step, "partial_epoch": not this.complete,
                 "train_bce": train_bce, "val_bce": val_bce, "seconds": seconds, "images_per_s": seen / seconds,
                 "skipped_steps": this.skipped, "rollbacks": ctx.faults.rollbacks})
        with torch.no_grad():
            originals = val_images[:32]
            pairs = torch.stack([originals, ae.decode(ae.encode(originals))], 1).flatten(0, 1)
        ctx.save_samples(pairs, this.index, step, nrow=8)
        stage = "flow" if ae_epoch >= cfg.ae_epochs else "autoencoder"
        fields = ae_fields(step) if stage == "autoencoder" else {**ae_fields(step), "stage": "flow", "optimizer_state": None}
        ctx.checkpoint({**fields, **({} if this.complete else this.position())}, best=False)
        ctx.console.say(f"autoencoder epoch {this.index}: train BCE {train_bce:.2f}, val BCE {val_bce:.2f}, {seconds:.1f} s")
    if stage == "autoencoder":
        return  # out of budget before the flow stage

    ae.requires_grad_(False)
    embeddings, val_embeddings = _encode(model, images), _encode(model, val_images)
    flow_params = [p for name, p in model.named_parameters() if not name.startswith("autoencoder.")]
    optimizer = make_adam(flow_params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    # At the change of stage (flow epoch 0, no pass under way) the stored optimizer, if any, is the autoencoder's.
    if state.get("stage") == "flow" and state.get("optimizer_state") and (epoch > 0 or state.get("pass")):
        optimizer.load_state_dict(state["optimizer_state"])

    def nll(e: Tensor, y: Tensor) -> Tensor:
        return -model.embedding_log_prob(e, y if conditional else None).mean()

    def flow_fields(step):
        return {"stage": "flow", "ae_epoch": ae_epoch, "epoch": epoch, "step": step, "best_val_nll": best,
                "optimizer_state": optimizer.state_dict()}

    while epoch < cfg.epochs and not ctx.budget.spent(step):
        model.flow.train()
        this = start_pass(len(embeddings), cfg.ae_epochs + epoch + 1, cfg, dev, ctx.state)
        seen_before, started = this.seen, time.perf_counter()
        step = train_pass(ctx, optimizer, this, lambda idx, _: (nll(embeddings[shard(idx)], labels[shard(idx)]),) * 2, step=step,
                          desc=f"flow {epoch + 1}/{cfg.epochs}", postfix=lambda v: f"NLL={v:.3f}", fields=flow_fields,
                          schedule=lambda step: lr_factor(cfg, step - ae_steps, steps_per_epoch))
        seconds, seen, train_nll = time.perf_counter() - started, this.seen - seen_before, this.mean_loss()
        epoch += this.complete
        model.eval()
        val_nll = _mean_over(lambda a, b: nll(val_embeddings[a:b], val_labels[a:b]), len(val_embeddings))
        if not math.isfinite(val_nll):
            raise TrainingError(f"validation NLL is {val_nll} after flow epoch {epoch}")
        improved = val_nll < best
        best = min(best, val_nll)
        ctx.log({"stage": "flow", "epoch": this.index - cfg.ae_epochs, "step": step,
                 "partial_epoch": not this.complete, "train_nll": train_nll, "val_nll": val_nll,
                 "seconds": seconds, "images_per_s": seen / seconds, "skipped_steps": this.skipped,
                 "rollbacks": ctx.faults.rollbacks})
        grid_labels = torch.arange(10 * 8, device=dev) // 8 % model.num_classes
        ctx.save_samples(model.sample(len(grid_labels), grid_labels if conditional else None), this.index, step)
        ctx.checkpoint({**flow_fields(step), **({} if this.complete else this.position())}, best=improved)
        ctx.console.say(f"flow epoch {this.index - cfg.ae_epochs}: train NLL {train_nll:.3f}, val NLL {val_nll:.3f} nats"
                       f"{' (best)' if improved else ''}, {seconds:.1f} s")
