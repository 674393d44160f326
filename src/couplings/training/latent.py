"""The latent trainer (`LatentRealNVP`): the autoencoder, then the flow on frozen embeddings."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from couplings.distributed import shard
from couplings.models import LatentRealNVP
from couplings.training.errors import TrainingError
from couplings.training.loop import Context, Stage, TrainState, run_stage
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
    Each stage's learning-rate schedule counts its own steps. Both run on
    `couplings.training.loop.run_stage`: they checkpoint every epoch (and every
    ``checkpoint_every`` steps) and resume exactly where they stopped."""
    ckpt = ctx.state
    best = None if ckpt is None else ckpt.best_val_nll
    if ckpt is None or ckpt.stage in (None, "autoencoder"):
        state = TrainState.of(ckpt, best)
        state.epoch = 0 if ckpt is None else ckpt.ae_epoch or 0
        state = run_stage(ctx, _autoencoder_stage(ctx), state)
        if state.epoch < ctx.cfg.ae_epochs:
            return  # out of budget before the flow stage
        state.epoch = 0
    else:
        state = TrainState.of(ckpt, best)
    run_stage(ctx, _flow_stage(ctx), state)


def _autoencoder_stage(ctx: Context) -> Stage:
    model: LatentRealNVP = ctx.model
    cfg, ae, ckpt = ctx.cfg, model.autoencoder, ctx.state
    images, val_images = _to_unit(ctx.train_data[0]).to(ctx.device), _to_unit(ctx.val_data[0]).to(ctx.device)
    ae_steps = cfg.ae_epochs * (len(images) // cfg.batch_size)  # full batches (`start_pass`)

    def schedule(step: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * min(1.0, step / ae_steps))) if cfg.ae_lr_schedule == "cosine" else 1.0

    # The seed project's autoencoder optimizer: Adam's own betas and eps, not the flow's.
    optimizer = make_adam(ae.parameters(), lr=cfg.ae_lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    if ckpt is not None and ckpt.optimizer_state is not None:
        optimizer.load_state_dict(ckpt.optimizer_state)

    def sample():  # validation images beside their reconstructions
        originals = val_images[:32]
        return torch.stack([originals, ae.decode(ae.encode(originals))], 1).flatten(0, 1)

    def fields(state: TrainState) -> dict:
        finished = state.epoch >= cfg.ae_epochs  # the next start is the flow's: with its own optimizer
        return {"stage": "flow" if finished else "autoencoder", "ae_epoch": state.epoch, "epoch": 0,
                "best_val_nll": state.best, **({"optimizer_state": None} if finished else {})}

    return Stage("autoencoder", ae, optimizer, lambda idx, _: (ae.loss(images[shard(idx)]),) * 2, cfg.ae_epochs,
                 len(images), validate=lambda: {"val_bce": _mean_over(lambda a, b: ae.loss(val_images[a:b]), len(val_images))},
                 sample=sample, train_fields=lambda bce: {"train_bce": bce}, fields=fields, schedule=schedule,
                 log_fields={"stage": "autoencoder"})


def _flow_stage(ctx: Context) -> Stage:
    model: LatentRealNVP = ctx.model
    cfg, dev, ckpt = ctx.cfg, ctx.device, ctx.state
    images, val_images = _to_unit(ctx.train_data[0]).to(dev), _to_unit(ctx.val_data[0]).to(dev)
    labels, val_labels = (torch.as_tensor(y).long().to(dev) for y in (ctx.train_data[1], ctx.val_data[1]))
    model.autoencoder.requires_grad_(False)
    embeddings, val_embeddings = _encode(model, images), _encode(model, val_images)
    flow_params = [p for name, p in model.named_parameters() if not name.startswith("autoencoder.")]
    optimizer = make_adam(flow_params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    # At the change of stage the checkpoint holds no optimizer (the autoencoder's is not carried over).
    if ckpt is not None and ckpt.stage == "flow" and ckpt.optimizer_state is not None:
        optimizer.load_state_dict(ckpt.optimizer_state)
    steps_per_epoch = len(images) // cfg.batch_size
    ae_steps = cfg.ae_epochs * steps_per_epoch

    def nll(e: Tensor, y: Tensor) -> Tensor:
        return -model.embedding_log_prob(e, y if model.conditional else None).mean()

    def validate():
        val_nll = _mean_over(lambda a, b: nll(val_embeddings[a:b], val_labels[a:b]), len(val_embeddings))
        if not math.isfinite(val_nll):
            raise TrainingError(f"validation NLL is {val_nll} after a flow epoch")
        return {"val_nll": val_nll}

    grid_labels = torch.arange(10 * 8, device=dev) // 8 % model.num_classes
    return Stage("flow", model.flow, optimizer, lambda idx, _: (nll(embeddings[shard(idx)], labels[shard(idx)]),) * 2,
                 cfg.epochs, len(embeddings), validate=validate,
                 sample=lambda: model.sample(len(grid_labels), grid_labels if model.conditional else None),
                 train_fields=lambda v: {"train_nll": v}, score="val_nll",
                 fields=lambda state: {"stage": "flow", "ae_epoch": cfg.ae_epochs, "best_val_nll": state.best},
                 schedule=lambda step: lr_factor(cfg, step - ae_steps, steps_per_epoch), passes_before=cfg.ae_epochs,
                 log_fields={"stage": "flow"})
