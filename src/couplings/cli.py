"""The ``couplings`` command line: a thin layer over the library's train, eval and sample."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path

import torch

from couplings import __version__, checkpoint, data
from couplings.checkpoint import CheckpointError
from couplings.config import ConfigError, TrainConfig, split_overrides
from couplings.data import DatasetError
from couplings.evaluate import NonFiniteLogProbError, log_probs, nats_to_bits_per_dim
from couplings.hardware import describe, resolve_device
from couplings.images import save_grid
from couplings.models import MODELS
from couplings.train import TrainingError, load_split, train

# Errors that are the user's input or environment, reported as one line without a traceback:
# usage errors exit with 2, runtime errors with 1.
USAGE_ERRORS = (ConfigError,)
RUNTIME_ERRORS = (CheckpointError, DatasetError, NonFiniteLogProbError, TrainingError, OSError, ValueError)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """Usage errors: one line on stderr, exit code 2."""
        print(f"error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, found {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, found {text}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="couplings", description="Train, evaluate and sample coupling-layer normalizing flows.")
    parser.add_argument("--version", action="version", version=f"couplings {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = commands.add_parser("train", help="train a model into a run directory")
    t.add_argument("model", choices=sorted(MODELS))
    t.add_argument("--dataset", choices=sorted(data.DATASETS))
    t.add_argument("--epochs", type=_positive_int)
    t.add_argument("--max-steps", type=_positive_int, help="stop after this many optimizer steps")
    t.add_argument("--max-minutes", type=_positive_float, help="stop after this much wall-clock in this invocation")
    t.add_argument("--batch-size", type=_positive_int)
    t.add_argument("--seed", type=int)
    t.add_argument("--out", type=Path, help="run directory (default: runs/MODEL-DATASET-TIME)")
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model or training option, e.g. hidden_units=64 or size=small")
    t.add_argument("--quiet", action="store_true", help="no progress bars")

    e = commands.add_parser("eval", help="test bits/dim of a run or checkpoint; writes eval.json")
    e.add_argument("run", type=Path, metavar="RUN_DIR_OR_CHECKPOINT")
    e.add_argument("--dataset", choices=sorted(data.DATASETS), help="default: the dataset the run trained on")
    e.add_argument("--split", default="test", choices=["test", "val"])
    e.add_argument("--batch-size", type=_positive_int, default=1000)
    e.add_argument("--seed", type=int, default=0, help="seed of the dequantization noise")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    s = commands.add_parser("sample", help="draw samples from a run or checkpoint into a PNG grid")
    s.add_argument("run", type=Path, metavar="RUN_DIR_OR_CHECKPOINT")
    s.add_argument("-n", type=_positive_int, default=64, help="number of samples")
    s.add_argument("--temperature", type=_positive_float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--nrow", type=_positive_int, default=8, help="images per row")
    s.add_argument("-o", "--output", type=Path, required=True, metavar="FILE.png")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    d = commands.add_parser("data", help="dataset files")
    d_commands = d.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    f = d_commands.add_parser("fetch", help="download a dataset into the cache and print where it is")
    f.add_argument("name", nargs="?", default="mnist", choices=sorted(data.DATASETS))
    f.add_argument("--root", type=Path, help="data directory (default: $COUPLINGS_DATA or ~/.cache/couplings)")
    return parser


def _cmd_train(args) -> int:
    entry = MODELS[args.model]
    size, model_overrides, train_overrides = split_overrides(args.overrides, entry.config, entry.train_config)
    flags = {"dataset": args.dataset, "epochs": args.epochs, "max_steps": args.max_steps,
             "max_minutes": args.max_minutes, "batch_size": args.batch_size, "seed": args.seed}
    train_overrides.update({k: v for k, v in flags.items() if v is not None})
    out = args.out
    if out is None:
        if args.resume:
            raise ConfigError("--resume needs --out pointing at the run to continue")
        dataset = train_overrides.get("dataset", TrainConfig.dataset)
        out = Path("runs") / f"{args.model}-{dataset}-{datetime.now():%Y%m%d-%H%M%S}"
    print(f"run directory: {out}", file=sys.stderr)
    train(args.model, out, train_overrides=train_overrides, model_overrides=model_overrides, size=size,
          device=args.device, resume=args.resume, progress=not args.quiet)
    print(out)
    return 0


def _cmd_eval(args) -> int:
    device = resolve_device(args.device)
    model, state = checkpoint.load_model(args.run, device)
    train_config = state.get("train", {})
    dataset = args.dataset or train_config.get("dataset", "mnist")
    images, _ = load_split(dataset, args.split, train_config.get("val_size", TrainConfig.val_size))
    started = time.perf_counter()
    lp = log_probs(model, images, batch_size=args.batch_size, seed=args.seed, progress=True)
    dim = lp.new_tensor(images.shape[1:]).prod().item()
    log_likelihood = float(lp.mean())
    result = {
        "checkpoint": str(checkpoint.resolve(args.run)),
        "model": state["model"],
        "dataset": dataset,
        "split": args.split,
        "num_images": len(images),
        "dimensions": int(dim),
        "bits_per_dim": nats_to_bits_per_dim(log_likelihood, int(dim)),
        "log_likelihood_nats": log_likelihood,
        "dequantization_seed": args.seed,
        "epoch": state.get("epoch"),
        "step": state.get("step"),
        "seconds": time.perf_counter() - started,
        "hardware": describe(device),
    }
    print(f"{state['model']} on {dataset} {args.split} ({len(images)} images): "
          f"{result['bits_per_dim']:.4f} bits/dim, log-likelihood {log_likelihood:.2f} nats")
    published = MODELS[state["model"]].published
    if published and dataset == "mnist":
        bpd, source = published
        print(f"published: {bpd} bits/dim ({source}); this run is {result['bits_per_dim'] - bpd:+.4f} bits/dim from it")
    run_dir = checkpoint.resolve(args.run).parent
    eval_path = run_dir / "eval.json"
    previous = json.loads(eval_path.read_text()) if eval_path.is_file() else {}
    previous[args.split if dataset == train_config.get("dataset", dataset) else f"{dataset}-{args.split}"] = result
    tmp = eval_path.with_name(f".eval.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(previous, indent=2) + "\n")
    os.replace(tmp, eval_path)
    print(f"wrote {eval_path}", file=sys.stderr)
    return 0


def _cmd_sample(args) -> int:
    output = args.output
    if output.suffix.lower() != ".png":
        raise ConfigError(f"output must be a .png file, found {output}")
    if not output.parent.resolve().is_dir():
        raise ConfigError(f"output directory {output.parent} does not exist")
    device = resolve_device(args.device)
    model, _ = checkpoint.load_model(args.run, device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    images = model.sample(args.n, temperature=args.temperature, generator=generator)
    bad = int((~torch.isfinite(images)).flatten(1).any(1).sum())
    if bad:
        raise NonFiniteLogProbError(f"{bad} of {args.n} samples are not finite; nothing written")
    save_grid(images, output, nrow=args.nrow)
    print(output)
    return 0


def _cmd_data(args) -> int:
    directory = data.fetch(args.name, args.root)
    print(directory)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    commands = {"train": _cmd_train, "eval": _cmd_eval, "sample": _cmd_sample, "data": _cmd_data}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("error: interrupted; the last completed epoch is in last.pt (continue with --resume)", file=sys.stderr)
        return 130
    except USAGE_ERRORS + RUNTIME_ERRORS as e:
        if args.debug:
            traceback.print_exc()
        message = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.filename}: {e.strerror}"
        print(f"error: {message}", file=sys.stderr)
        return 2 if isinstance(e, USAGE_ERRORS) else 1


if __name__ == "__main__":
    sys.exit(main())
