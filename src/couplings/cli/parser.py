"""The ``couplings`` argument parser: argument types, the train flags built from the config
dataclasses, and one sub-parser per command."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import typing
from pathlib import Path
from typing import Any

from couplings import __version__, data
from couplings.config import (
    PRECISIONS,
    ConfigError,
    PixelTrainConfig,
    TrainConfig,
    parse_value,
)
from couplings.models import MODELS


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
    _, kind = _config_field(name)
    flag = "--" + name.replace("_", "-")
    if kind is bool:
        parser.add_argument(flag, action="store_true", default=None, help=f"{help_text} (--set {name}=true)")
        return
    metavar = "{" + ",".join(PRECISIONS) + "}" if name == "precision" else "N" if int in (kind, *typing.get_args(kind)) else "X"
    parser.add_argument(flag, type=_config_value(name), metavar=metavar, help=f"{help_text} (--set {name}={metavar})")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="couplings", description="Train, evaluate and sample coupling-layer normalizing flows.")
    parser.add_argument("--version", action="version", version=f"couplings {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_train, _add_config, _add_eval_and_export, _add_sample_and_interpolate, _add_compare_and_data):
        add(commands)
    return parser


def _add_train(commands) -> None:
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


def _add_config(commands) -> None:
    c = commands.add_parser("config", help="print every option of a model and its training, as --set lines")
    c.add_argument("model", choices=sorted(MODELS))
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="as for train, e.g. size=small or hidden_units=64")


def _add_eval_and_export(commands) -> None:
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


def _add_sample_and_interpolate(commands) -> None:
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


def _add_compare_and_data(commands) -> None:
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


