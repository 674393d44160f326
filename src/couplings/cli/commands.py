"""The ``couplings`` commands, one function per sub-command: each takes the parsed arguments and
returns the exit status."""

from __future__ import annotations

import os
import shutil
import sys
from datetime import datetime
from pathlib import Path

import torch

from couplings import checkpoint, data, distributed
from couplings.cli.parser import TRAIN_FLAGS
from couplings.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    option_lines,
    split_overrides,
)
from couplings.evaluation import evaluate_checkpoint
from couplings.hardware import resolve_device
from couplings.images import save_grid
from couplings.likelihood import NonFiniteLogProbError, dequantize
from couplings.models import MODELS
from couplings.report import compare
from couplings.rundir import RunDir
from couplings.sampling import interpolate, label_grid, temperature_sweep
from couplings.training import plan_run, run_plan


def _cmd_train(args) -> int:
    entry = MODELS[args.model]
    size, model_overrides, train_overrides = split_overrides(args.overrides, entry.config, entry.train_config, args.model)
    flags = {name: getattr(args, name) for name in ("dataset", *TRAIN_FLAGS)}
    train_overrides.update({k: v for k, v in flags.items() if v is not None})
    out = args.out
    if out is None:
        if args.resume:
            raise ConfigError("--resume needs --out pointing at the run to continue")
        if distributed.world_size() > 1:  # a name from the clock could differ between the processes
            raise ConfigError("under torchrun, give --out: every process must name the same run directory")
        dataset = data.short_name(train_overrides.get("dataset", TrainConfig.dataset))
        out = Path("runs") / f"{args.model}-{dataset}-{datetime.now():%Y%m%d-%H%M%S}"
    _check_writable_dir(out, "--out")
    # Everything is checked (options, run directory, checkpoint, data) before anything is printed or written.
    plan = plan_run(args.model, out, train_overrides=train_overrides, model_overrides=model_overrides, size=size,
                    resume=args.resume)
    if args.out is None:
        print(f"run directory: {out}", file=sys.stderr)
    run_plan(plan, device=args.device, progress=not args.quiet, tensorboard=args.tensorboard)
    if distributed.is_main():
        print(out)
    return 0


def _cmd_config(args) -> int:
    """Prints the options `train` would use with these --set lines: model, then training."""
    entry = MODELS[args.model]
    size, model_overrides, train_overrides = split_overrides(args.overrides, entry.config, entry.train_config, args.model)
    size = size or next(iter(entry.presets))
    if size not in entry.presets:
        raise ConfigError(f"size must be one of {sorted(entry.presets)} for {args.model}, found {size!r}")
    preset_model, preset_train = entry.preset(size)
    model = apply_overrides(entry.config(), {**preset_model, **model_overrides})
    train = apply_overrides(entry.train_config(), {**preset_train, **train_overrides})
    print(f"# couplings train {args.model}: size={size} (sizes: {', '.join(entry.presets)})")
    print(f"--set size={size}")
    print(f"# model options ({entry.config.__name__})")
    print("\n".join(option_lines(model, entry.config(), preset_model, model_overrides, size)))
    print(f"# training options ({entry.train_config.__name__}); --epochs, --batch-size, ... set the same fields")
    print("\n".join(option_lines(train, entry.train_config(), preset_train, train_overrides, size)))
    return 0


def _check_writable_dir(directory: Path, what: str, must_exist: bool = False) -> None:
    """Refuses a directory that output cannot go into: a file at or above it, or no write permission."""
    existing = next(p for p in (directory, *directory.absolute().parents) if p.exists())
    if not existing.is_dir():
        found = "a file" if existing == directory else f"a file at {existing}"
        raise ConfigError(f"{what} {directory}: expected a directory, found {found}")
    if must_exist and existing != directory:
        raise ConfigError(f"{what} {directory} does not exist; expected an existing directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {directory}: expected a writable directory, found {existing} read-only")


def _model_path(args) -> Path:
    """The run or checkpoint a command acts on: RUN_DIR_OR_CHECKPOINT, or --pretrained NAME."""
    if (args.run is None) == (args.pretrained is None):
        raise ConfigError("give either RUN_DIR_OR_CHECKPOINT or --pretrained NAME")
    return checkpoint.pretrained_path(args.pretrained) if args.pretrained else args.run


def _cmd_eval(args) -> int:
    args.run = _model_path(args)
    result = evaluate_checkpoint(args.run, dataset=args.dataset, split=args.split, samples=args.samples,
                                 temperature=args.temperature, seed=args.seed, batch_size=args.batch_size,
                                 importance_samples=args.importance_samples, num_images=args.images,
                                 device=resolve_device(args.device), progress=True)
    where = f"{result.model} on {result.dataset} {args.split} ({result.num_images} images)"
    if not result.has_pixel_density:
        print(f"{where}: {result.bits_per_dim_note}; latent NLL {result.latent_nll_nats:.3f} nats "
              f"({result.latent_dimensions}-d embedding)")
    else:
        print(f"{where}: {result.bits_per_dim:.4f} bits/dim, log-likelihood {result.log_likelihood_nats:.2f} nats "
              f"({result.estimate})")
    if result.reconstruction_max_abs_error is not None:
        print(f"reconstruction: max |inverse(transform(x)) - x| = {result.reconstruction_max_abs_error:.2e}")
    if result.published_bits_per_dim is not None:
        gap = result.bits_per_dim - result.published_bits_per_dim
        print(f"published: {result.published_bits_per_dim:.3f} bits/dim ({result.published_source}); "
              f"this run is {gap:+.4f} bits/dim from it")
    quality = result.sample_quality or {}
    if "fid" in quality:
        line = (f"{quality['num_samples']} samples at T={quality['temperature']}: FID {quality['fid']:.3f}, "
                f"KID {quality['kid']:.5f}, precision {quality['precision']:.3f}, recall {quality['recall']:.3f}, "
                f"nearest-train L2 {quality['nearest_train_l2']:.3f}")
        if "conditional_accuracy" in quality:
            line += f", conditional accuracy {quality['conditional_accuracy']:.4f}"
        print(line)
        print(f"features: {quality['feature_extractor']}")
    elif "skipped" in quality:
        print(f"sample quality skipped: {quality['skipped']}")
    if args.pretrained:
        return 0  # eval.json belongs in run directories; the package's pretrained models stay as shipped
    key = args.split if args.dataset is None else f"{result.dataset}-{args.split}"
    key = key if args.temperature == 1.0 else f"{key}@T={args.temperature:g}"
    key = key if args.importance_samples == 1 else f"{key}@K={args.importance_samples}"
    eval_path = RunDir(Path(result.checkpoint).parent).update_eval(key, result)
    print(f"wrote {eval_path}", file=sys.stderr)
    return 0


def _cmd_export(args) -> int:
    if args.format == "safetensors":
        if args.half:
            raise ConfigError("--half applies to --format pt only")
        try:
            import safetensors  # noqa: F401
        except ImportError:
            raise ConfigError("--format safetensors needs the safetensors package: pip install safetensors") from None
        print(checkpoint.export_safetensors(args.run, args.out))
    else:
        print(checkpoint.export_pretrained(args.run, args.out, half=args.half))
    return 0


def _cmd_sample(args) -> int:
    output = _checked_png(args.output)
    args.run = _model_path(args)
    device = resolve_device(args.device)
    model, _ = checkpoint.load_model(args.run, device)
    conditional = model.conditional
    if args.temperatures and conditional:
        raise ConfigError("--temperatures is for unconditional models; use --temperature with --label instead")
    if args.label is not None and not conditional:
        raise ConfigError(f"--label needs a class-conditional model; {args.run} is not one")
    if args.label is not None and args.label >= model.num_classes:
        raise ConfigError(f"--label: expected 0-{model.num_classes - 1} for {args.run}, found {args.label}")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if conditional:
        # One row per digit (or only the one asked for), each row sorted by log-density, densest first.
        per_row = args.n or 10
        labels = [args.label] if args.label is not None else None
        images = label_grid(model, per_row, labels=labels, temperature=args.temperature, generator=generator)
        nrow = per_row
    elif args.temperatures:
        images, nrow = temperature_sweep(model, args.temperatures, args.n or 8, args.seed), args.n or 8
    else:
        images, nrow = model.sample(args.n or 64, temperature=args.temperature, generator=generator), args.nrow
    bad = int((~torch.isfinite(images)).flatten(1).any(1).sum())
    if bad:
        raise NonFiniteLogProbError(f"{bad} of {len(images)} samples are not finite; nothing written")
    save_grid(images, output, nrow=nrow)
    print(output)
    return 0


def _checked_png(output: Path) -> Path:
    if output.suffix.lower() != ".png":
        raise ConfigError(f"output must be a .png file, found {output}")
    if output.is_dir():
        raise ConfigError(f"output {output}: expected a .png file, found a directory")
    _check_writable_dir(output.parent, "output directory", must_exist=True)
    return output


def _cmd_interpolate(args) -> int:
    output = _checked_png(args.output)
    device = resolve_device(args.device)
    model, state = checkpoint.load_model(args.run, device)
    if not model.has_pixel_density or model.conditional:
        raise ConfigError(f"{state.model} is {'class-conditional' if model.conditional else 'a lossy embedding'}; "
                          "interpolate needs an unconditional invertible pixel model")
    images, _ = data.load(state.train.get("dataset", "mnist"), "test")
    generator = torch.Generator().manual_seed(args.seed)
    chosen = torch.randperm(len(images), generator=generator)[: 2 * args.pairs]
    x = dequantize(torch.as_tensor(data.with_channels(images[chosen.numpy()])), generator).to(device)
    x = x.to(model.prior.dtype)
    grid = interpolate(model, x[: args.pairs], x[args.pairs :], args.steps)
    save_grid(grid, output, nrow=args.steps)
    print(output)
    return 0


def _cmd_compare(args) -> int:
    for run in args.runs:
        name = str(run).removeprefix("pretrained:")
        if name != str(run):
            checkpoint.load_model(checkpoint.pretrained_path(name))  # an unknown name is refused before any work
            continue
        if not (run / "config.json").is_file():
            raise ConfigError(f"{run} is not a run directory (no config.json); give directories written by "
                              "'couplings train', or pretrained:NAME")
        checkpoint.load_model(run)  # a bad checkpoint is refused before any work or output
    _check_writable_dir(args.out, "--out")
    created = not args.out.exists()
    try:
        report = compare(args.runs, args.out, samples=args.samples, draws=args.draws, test_images=args.test_images,
                         ood_images=args.ood_images, ood_dataset=args.ood_dataset, jobs=args.jobs,
                         device=resolve_device(args.device), progress=True)
    except BaseException:
        if created:  # no half-written report is left behind
            shutil.rmtree(args.out, ignore_errors=True)
        raise
    print(report.directory / "report.html")
    return 0


def _cmd_data(args) -> int:
    directory = data.fetch(args.name, args.root)
    print(directory)
    return 0


COMMANDS = {"train": _cmd_train, "config": _cmd_config, "eval": _cmd_eval, "export": _cmd_export, "sample": _cmd_sample,
            "interpolate": _cmd_interpolate, "compare": _cmd_compare, "data": _cmd_data}
