"""The ``couplings`` command line: a thin layer over the library's train, eval and sample."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import sys
import traceback
import typing
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from couplings import __version__, checkpoint, data, distributed
from couplings.checkpoint import CheckpointError
from couplings.config import (
    PRECISIONS,
    ConfigError,
    PixelTrainConfig,
    TrainConfig,
    apply_overrides,
    option_lines,
    parse_value,
    split_overrides,
)
from couplings.data import DatasetError
from couplings.evaluation import evaluate_checkpoint
from couplings.hardware import resolve_device
from couplings.images import save_grid
from couplings.likelihood import NonFiniteLogProbError, dequantize
from couplings.models import MODELS
from couplings.report import compare
from couplings.rundir import RunDir, RunDirBusy
from couplings.sampling import interpolate, label_grid, temperature_sweep
from couplings.training import StoppedBySignal, TrainingError, plan_run, run_plan

# Errors that are the user's input or environment, reported as one line without a traceback:
# usage errors exit with 2, runtime errors with 1.
USAGE_ERRORS = (ConfigError,)
RUNTIME_ERRORS = (ArithmeticError, CheckpointError, DatasetError, distributed.DistributedError, RunDirBusy, TrainingError,
                  OSError, ValueError)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """Usage errors: one line on stderr, exit code 2."""
        print(f"error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def _int_at_least(low: int, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, found {text}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(1, text)


def _non_negative_int(text: str) -> int:
    return _int_at_least(0, text)


def _dataset(text: str) -> str:
    if text in data.DATASETS or data.is_path_dataset(text):
        return text
    raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(sorted(data.DATASETS))}, "
                                     f"or give {data.OWN_DATASET})")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a number > 0, found {text}")
    return value


def _temperature_list(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, found {text}") from None
    if not values or not all(0 < t < math.inf for t in values):
        raise argparse.ArgumentTypeError(f"expected temperatures > 0, found {text}")
    return values


def _digit(text: str) -> int:
    if text.strip() not in [str(d) for d in range(10)]:
        raise argparse.ArgumentTypeError(f"expected a digit label 0-9, found {text}")
    return int(text)


def _add_model_source(command: argparse.ArgumentParser) -> None:
    """RUN_DIR_OR_CHECKPOINT or --pretrained NAME (see `_model_path`)."""
    command.add_argument("run", type=Path, nargs="?", metavar="RUN_DIR_OR_CHECKPOINT")
    command.add_argument("--pretrained", metavar="NAME", help="a pretrained model shipped with couplings instead of a run")


# `train` flags that stand for `--set FIELD=VALUE`: each is parsed by couplings.config as --set
# parses it and checked by the config dataclass that owns the field, where its type, default and
# bounds are written once; only the help line is the command line's own.
TRAIN_FLAGS = {
    "epochs": "passes over the training set",
    "max_steps": "stop after this many optimizer steps",
    "max_minutes": "stop after this much wall-clock in this invocation",
    "checkpoint_every": "also write last.pt every N steps inside an epoch (--resume continues from there exactly)",
    "batch_size": "images per optimizer step",
    "seed": "seed of the initialisation, the data order and the dequantization noise",
    "compile": "torch.compile the training loss",
    "precision": "bf16: autocast convolutions and matmuls (log-dets and the loss stay float32); "
                 "auto: bf16 where a short timed probe finds it faster",
    "channels_last": "channels-last memory format",
}


def _config_field(name: str) -> tuple[type, Any]:
    """The config dataclass that owns training option ``name``, and the field's type."""
    owner = TrainConfig if name in {f.name for f in dataclasses.fields(TrainConfig)} else PixelTrainConfig
    return owner, typing.get_type_hints(owner)[name]


def _config_value(name: str):
    """An argparse type: parses like ``--set name=TEXT`` and runs the owning config's checks."""
    owner, _ = _config_field(name)

    def parse(text: str):
        try:
            value = parse_value(owner, name, text)
            owner(**{name: value})
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value
    return parse


def _add_config_flag(parser: argparse.ArgumentParser, name: str, help_text: str) -> None:
    owner, kind = _config_field(name)
    flag = "--" + name.replace("_", "-")
    if kind is bool:
        parser.add_argument(flag, action="store_true", default=None, help=f"{help_text} (--set {name}=true)")
        return
    metavar = "{" + ",".join(PRECISIONS) + "}" if name == "precision" else "N" if int in (kind, *typing.get_args(kind)) else "X"
    parser.add_argument(flag, type=_config_value(name), metavar=metavar, help=f"{help_text} (--set {name}={metavar})")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="couplings", description="Train, evaluate and sample coupling-layer normalizing flows.")
    parser.add_argument("--version", action="version", version=f"couplings {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = commands.add_parser("train", help="train a model into a run directory",
                            description="Train a model into a run directory. Options not given keep the model's "
                                        "recipe; 'couplings config MODEL' prints every option and its value.")
    t.add_argument("model", choices=sorted(MODELS))
    t.add_argument("--dataset", type=_dataset, metavar="NAME_OR_PATH",
                   help=f"{', '.join(sorted(data.DATASETS))}, or {data.OWN_DATASET} (docs/own-data.md)")
    for name, help_text in TRAIN_FLAGS.items():
        _add_config_flag(t, name, help_text)
    t.add_argument("--out", type=Path, help="run directory (default: runs/MODEL-DATASET-TIME)")
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model or training option, e.g. hidden_units=64 or size=small")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.add_argument("--tensorboard", action="store_true",
                   help="also log to RUN/tensorboard/ (needs: pip install 'couplings[tensorboard]')")

    c = commands.add_parser("config", help="print every option of a model and its training, as --set lines")
    c.add_argument("model", choices=sorted(MODELS))
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="as for train, e.g. size=small or hidden_units=64")

    e = commands.add_parser("eval", help="test bits/dim of a run or checkpoint; writes eval.json")
    _add_model_source(e)
    e.add_argument("--dataset", choices=sorted(data.DATASETS), help="default: the dataset the run trained on")
    e.add_argument("--split", default="test", choices=["test", "val"])
    e.add_argument("--batch-size", type=_positive_int, default=1000)
    e.add_argument("--seed", type=_config_value("seed"), default=0, help="seed of the dequantization noise and the samples")
    e.add_argument("--samples", type=_non_negative_int, default=10_000, help="samples for the quality metrics (0: skip them)")
    e.add_argument("--importance-samples", type=_positive_int, default=1, metavar="K",
                   help="K > 1: the importance-weighted bits/dim over K dequantization draws (what papers "
                        "with variational dequantization report); 1: the bound of one draw")
    e.add_argument("--temperature", type=_positive_float, default=1.0, help="sampling temperature for the metrics")
    e.add_argument("--images", type=_positive_int, metavar="N", help="score the first N images of the split (default: all)")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    x = commands.add_parser("export", help="write a run's best weights as safetensors + JSON config, or a small .pt")
    x.add_argument("run", type=Path, metavar="RUN_DIR_OR_CHECKPOINT")
    x.add_argument("--format", default="safetensors", choices=["safetensors", "pt"],
                   help="safetensors: OUT/model.safetensors and OUT/config.json (the format model hubs use); "
                        "pt: one small checkpoint file OUT, without optimizer state")
    x.add_argument("-o", "--out", type=Path, required=True)
    x.add_argument("--half", action="store_true", help="pt only: store float tensors in float16")

    s = commands.add_parser("sample", help="draw samples from a run or checkpoint into a PNG grid")
    _add_model_source(s)
    s.add_argument("-n", type=_positive_int, help="number of samples (default 64); per row for conditional models (default 10)")
    s.add_argument("--label", type=_digit, metavar="0-9", help="draw only this digit (conditional models)")
    s.add_argument("--temperature", type=_positive_float, default=1.0)
    s.add_argument("--temperatures", type=_temperature_list, metavar="T1,T2,...",
                   help="a sweep: one row per temperature from the same noise, e.g. 0.5,0.7,0.85,1.0")
    s.add_argument("--seed", type=_config_value("seed"), default=0)
    s.add_argument("--nrow", type=_positive_int, default=8, help="images per row")
    s.add_argument("-o", "--output", type=Path, required=True, metavar="FILE.png")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    i = commands.add_parser("interpolate", help="decode straight lines between the latents of test images")
    i.add_argument("run", type=Path, metavar="RUN_DIR_OR_CHECKPOINT")
    i.add_argument("-o", "--output", type=Path, required=True, metavar="FILE.png")
    i.add_argument("--pairs", type=_positive_int, default=4, help="image pairs, one row each")
    i.add_argument("--steps", type=_positive_int, default=8, help="images per row, ends included")
    i.add_argument("--seed", type=_config_value("seed"), default=0, help="picks the test images and their dequantization")
    i.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    c = commands.add_parser("compare", help="evaluate runs side by side; write report.md, report.html and figures")
    c.add_argument("runs", type=Path, nargs="+", metavar="RUN",
                   help="a run directory, or pretrained:NAME for a shipped model (evaluated like a run)")
    c.add_argument("--out", type=Path, default=Path("report"), help="report directory (default: report)")
    c.add_argument("--samples", type=_non_negative_int, default=10_000,
                   help="samples per run for the sample-quality metrics (0: skip them)")
    c.add_argument("--draws", type=_positive_int, default=3, help="dequantization draws for the bits/dim spread")
    c.add_argument("--test-images", type=_positive_int, metavar="N",
                   help="score every run on the first N test images (default: all of them)")
    c.add_argument("--jobs", type=_positive_int, default=1, metavar="J",
                   help="evaluate J runs at a time on the CPU, in processes of their share of the threads (default 1)")
    c.add_argument("--ood-images", type=_positive_int, help="test images per dataset in the out-of-distribution "
                   "histogram (default: all)")
    c.add_argument("--ood-dataset", choices=sorted(data.DATASETS),
                   help="the other dataset of that histogram (default: Fashion-MNIST for MNIST runs, and back)")
    c.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    d = commands.add_parser("data", help="dataset files")
    d_commands = d.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    f = d_commands.add_parser("fetch", help="download a dataset into the cache and print where it is")
    f.add_argument("name", nargs="?", default="mnist", choices=sorted(data.DATASETS))
    f.add_argument("--root", type=Path, help="data directory (default: $COUPLINGS_DATA or ~/.cache/couplings)")
    return parser


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
    where = f"{result['model']} on {result['dataset']} {args.split} ({result['num_images']} images)"
    if result["bits_per_dim"] is None:
        print(f"{where}: {result['bits_per_dim_note']}; latent NLL {result['latent_nll_nats']:.3f} nats "
              f"({result['latent_dimensions']}-d embedding)")
    else:
        print(f"{where}: {result['bits_per_dim']:.4f} bits/dim, log-likelihood {result['log_likelihood_nats']:.2f} nats "
              f"({result['estimate']})")
    if "reconstruction_max_abs_error" in result:
        print(f"reconstruction: max |inverse(transform(x)) - x| = {result['reconstruction_max_abs_error']:.2e}")
    if "published_bits_per_dim" in result:
        gap = result["bits_per_dim"] - result["published_bits_per_dim"]
        print(f"published: {result['published_bits_per_dim']:.3f} bits/dim ({result['published_source']}); "
              f"this run is {gap:+.4f} bits/dim from it")
    quality = result.get("sample_quality", {})
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
    key = args.split if args.dataset is None else f"{result['dataset']}-{args.split}"
    key = key if args.temperature == 1.0 else f"{key}@T={args.temperature:g}"
    key = key if args.importance_samples == 1 else f"{key}@K={args.importance_samples}"
    eval_path = RunDir(Path(result["checkpoint"]).parent).update_eval(key, result)
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
        raise ConfigError(f"{state['model']} is {'class-conditional' if model.conditional else 'a lossy embedding'}; "
                          "interpolate needs an unconditional invertible pixel model")
    train_config = state.get("train", {})
    images, _ = data.load(train_config.get("dataset", "mnist"), "test")
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


def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _warning_line  # one plain line, like the errors
    parser = _build_parser()
    args = parser.parse_args(argv)
    commands = {"train": _cmd_train, "config": _cmd_config, "eval": _cmd_eval, "export": _cmd_export, "sample": _cmd_sample,
                "interpolate": _cmd_interpolate,
                "compare": _cmd_compare, "data": _cmd_data}
    rank = f"rank {distributed.rank()}: " if distributed.world_size() > 1 else ""  # under torchrun, whose line it is
    try:
        return commands[args.command](args)
    except StoppedBySignal as e:
        if distributed.is_main():
            print(f"couplings: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"{rank}error: interrupted; the last completed epoch is in last.pt (continue with --resume)", file=sys.stderr)
        return 130
    except USAGE_ERRORS + RUNTIME_ERRORS as e:
        if args.debug:
            traceback.print_exc()
        message = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.filename}: {e.strerror}"
        print(f"{rank}error: {message}", file=sys.stderr)
        return 2 if isinstance(e, USAGE_ERRORS) else 1


if __name__ == "__main__":
    sys.exit(main())
