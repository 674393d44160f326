"""The pixel-space trainer (NICE, Real NVP, Glow): maximum likelihood on dequantized images,
validated in bits/dim after every epoch."""

from __future__ import annotations

import copy
import dataclasses
import math
import time

import torch
import torch.nn.functional as F

from couplings.config import PixelTrainConfig
from couplings.data import with_channels
from couplings.distributed import max_over_ranks, shard
from couplings.likelihood import bits_per_dim, nats_to_bits_per_dim
from couplings.models.base import at_least_float32
from couplings.sampling import sample_labels
from couplings.training.loop import Context, Stage, TrainState, run_stage
from couplings.training.optim import EMA, make_adam
from couplings.transforms.mixture import MixtureCoupling2d

__all__ = ["bf16_harm", "discriminative_loss", "fit", "pixel_objective", "pixel_stage", "probe_precision", "training_nll", "training_terms"]

# precision=auto takes bf16 only where it is at least this much faster than float32.
BF16_MIN_SPEEDUP = 1.1


def fit(ctx: Context) -> None:
    """Trains until ``epochs`` epochs are done, the budget is spent or ``target_bpd`` is reached
    (`couplings.training.loop.run_stage`, with the stage of `pixel_stage`).

    A checkpoint's ``epoch`` counts completed epochs; one that stopped inside an epoch also
    holds that pass's position, and the next start continues it from the next batch. A stopped
    epoch is validated, logged and checkpointed like a full one. With ``ema_decay``, the Polyak
    averages of the weights are validated, sampled and stored beside the weights (``ema_state``;
    `couplings.checkpoint.load_model` loads them).
    """
    state = TrainState.of(ctx.state, None if ctx.state is None else ctx.state.best_val_bpd)
    run_stage(ctx, pixel_stage(ctx), state)


def pixel_stage(ctx: Context, val_images: int | None = None, val_seed: int | None = None) -> Stage:
    """The one stage of a pixel-space model: Adam (and Polyak averages, with ``ema_decay``) from
    ``ctx.state`` if it has them, on `pixel_objective`; validated in bits/dim on the first
    ``val_images`` validation images (all by default) with dequantization seed ``val_seed`` (the
    run's seed by default); samples as the run asks."""
    model, cfg, state = ctx.model, ctx.cfg, ctx.state
    optimizer = make_adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                          weight_decay=cfg.weight_decay, kernel=cfg.adam)
    if state is not None and state.optimizer_state is not None:
        optimizer.load_state_dict(state.optimizer_state)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None
    if ema is not None and state is not None and state.ema_state is not None:
        ema.load_state_dict(state.ema_state)
    pixels = torch.as_tensor(with_channels(ctx.train_data[0])).to(ctx.device)  # (N, C, H, W)
    labels = torch.as_tensor(ctx.train_data[1]).long().to(ctx.device) if model.conditional else None
    val_pixels, val_labels = ctx.val_data[0][:val_images], ctx.val_data[1][:val_images] if model.conditional else None
    dim = math.prod(pixels.shape[1:])

    def validate():
        return {"val_bpd": bits_per_dim(model, val_pixels, batch_size=cfg.eval_batch_size,
                                        seed=cfg.seed if val_seed is None else val_seed, labels=val_labels)}

    def done(scores):
        if cfg.target_bpd is None or scores["val_bpd"] > cfg.target_bpd:
            return False
        ctx.console.say(f"reached the target {cfg.target_bpd} bits/dim after {ctx.budget.elapsed() / 60:.1f} min")
        return True

    return Stage(
        "epoch", model, optimizer, pixel_objective(model, cfg, pixels, ctx.device, labels), cfg.epochs, len(pixels),
        validate=validate,
        sample=lambda: model.sample(cfg.samples_per_epoch, sample_labels(model, cfg.samples_per_epoch)),
        train_fields=lambda nll: {"train_bpd": nats_to_bits_per_dim(-nll, dim)},
        fields=lambda state: {"best_val_bpd": state.best}, score="val_bpd", ema=ema, done=done)


def pixel_objective(model, cfg: PixelTrainConfig, pixels: torch.Tensor, device: torch.device,
                    labels: torch.Tensor | None = None):
    """The objective of a `couplings.training.loop.Stage` for 8-bit ``pixels`` (N, C, H, W)
    (and their ``labels``, for a class-conditional model): ``(batch indices, generator) -> (loss,
    loss + penalty)``, the loss the negative dequantization bound of the batch (noise drawn from
    the pass's generator), the penalty Real NVP's L2 on the weight-norm scales."""
    # Weight-norm scales ("g"), the only weights Real NVP's L2 penalty applies to.
    wn_scales = [p for name, p in model.named_parameters() if name.endswith("parametrizations.weight.original0")]
    wn_scales = wn_scales if cfg.wn_l2 > 0 else []
    terms = training_terms(model, cfg, device)

    def objective(idx, generator):
        # The dequantization noise of the whole batch, then this rank's share of both (all of it on one process).
        noise = torch.rand((len(idx), *pixels.shape[1:]), generator=generator, device=pixels.device)
        idx, noise = shard(idx), shard(noise)
        loss, class_loss = terms(pixels[idx], noise, None if labels is None else labels[idx])
        penalty = cfg.wn_l2 * sum(g.square().sum() for g in wn_scales) if wn_scales else 0.0
        return loss, loss + penalty + class_loss
    return objective


def training_terms(model, cfg: PixelTrainConfig, device: torch.device):
    """``(pixels, noise, labels=None) -> (-mean (log p(x) - log q(u | k)), class loss)`` over a
    batch of 8-bit images and their dequantization noise (`couplings.models.Flow.pixel_log_prob`),
    the class loss the model's auxiliary loss on the latents (`couplings.models.Flow.class_loss`)
    plus the `discriminative_loss` (each 0 unless set), with the run's fast paths: channels-last
    inputs (and model), bf16 autocast (the terms come back float32), torch.compile.
    """
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)

    def both(pixels, noise, y):
        log_p, z = model.pixel_log_prob_and_latent(pixels, noise, y)
        class_loss = torch.zeros((), device=z.device)
        if y is not None:
            latent_loss = model.class_loss(z, y)
            if latent_loss is not None:
                class_loss = class_loss + latent_loss
            if cfg.discriminative_weight:
                n = cfg.discriminative_images
                class_loss = class_loss + discriminative_loss(model, pixels[:n], noise[:n], y[:n], cfg.discriminative_weight)
        return -log_p.mean(), class_loss

    compiled = torch.compile(both) if cfg.compile else both

    def terms(pixels, noise, y=None):
        if cfg.channels_last:
            pixels, noise = (t.contiguous(memory_format=torch.channels_last) for t in (pixels, noise))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            return tuple(t.float() for t in compiled(pixels, noise, y))
    return terms


def discriminative_loss(model, pixels: torch.Tensor, noise: torch.Tensor, y: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight * D`` times the cross-entropy (nats) of the labels ``y`` under the model's own
    classifier ``p(c | x) = softmax_c log p(x | c)`` (Bayes' rule with uniform classes) at the
    dequantized images: hybrid generative-discriminative training, which lowers ``p(x | c)`` on
    real images of the other classes. The dequantization is held fixed (its ``log q`` is the same
    for every class and cancels)."""
    with torch.no_grad():
        x, _ = model.dequantize(pixels, noise)
    logits = at_least_float32(model.class_log_likelihoods(x))
    return weight * model.dim * F.cross_entropy(logits, y.long())


def bf16_harm(model) -> str | None:
    """Why bf16 autocast is known to make ``model`` learn worse, or None."""
    if any(isinstance(m, MixtureCoupling2d) for m in model.modules()):
        return "logistic-mixture couplings, measured to learn worse in bf16 (docs/results.md)"
    return None


def probe_precision(model, cfg: PixelTrainConfig, device: torch.device, pixels: torch.Tensor,
                    labels: torch.Tensor | None = None, steps: int = 3) -> dict:
    """Times ``steps`` forward and backward passes of the training loss, after one warm-up, in
    float32 and in bf16 autocast, on a copy of ``model`` (so its weights, ActNorm's data-dependent
    start and the random streams of training are untouched) and one batch of ``pixels``; returns
    both rates (training images/s, the slowest process's under torchrun, so that every process
    chooses alike) and the choice: bf16 if it is at least `BF16_MIN_SPEEDUP` times faster.

    A model that bf16 is known to harm is not timed: it trains in float32 and the record says why
    (``bf16_harm``). Logistic-mixture couplings are such a model: on MNIST, 300 steps of Glow
    ``size=fast`` with them reached 1.1646 validation bits/dim in bf16 against 1.1466 in float32
    (`results/long-glow-mix-fast/precision-check.txt`)."""
    harm = bf16_harm(model)
    if harm:
        return {"chosen": "fp32", "bf16_harm": harm}
    probe = copy.deepcopy(model).to(device).train()
    batch = pixels[:cfg.batch_size].to(device)
    y = None if labels is None else labels[:cfg.batch_size].to(device)
    noise = torch.rand(batch.shape, generator=torch.Generator().manual_seed(0)).to(device)
    seconds = {}
    for precision in ("fp32", "bf16"):
        nll = training_nll(probe, dataclasses.replace(cfg, precision=precision, compile=False), device)
        for i in range(steps + 1):  # the first is the warm-up
            if i == 1:
                _synchronize(device)
                started = time.perf_counter()
            nll(batch, noise, y).backward()
            probe.zero_grad(set_to_none=True)
        _synchronize(device)
        seconds[precision] = (time.perf_counter() - started) / steps
    fp32, bf16 = max_over_ranks(seconds["fp32"], seconds["bf16"])
    return {"fp32_images_per_s": len(batch) / fp32, "bf16_images_per_s": len(batch) / bf16,
            "chosen": "bf16" if fp32 >= BF16_MIN_SPEEDUP * bf16 else "fp32"}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_nll(model, cfg: PixelTrainConfig, device: torch.device):
    """``(pixels, noise, labels=None) -> -mean (log p(x) - log q(u | k))``: the first of `training_terms`."""
    terms = training_terms(model, cfg, device)
    return lambda pixels, noise, y=None: terms(pixels, noise, y)[0]
