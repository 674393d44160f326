"""The ``couplings`` command line: a thin layer over the library's train, eval and sample
(`parser` builds the arguments, `commands` runs them)."""

from __future__ import annotations

import sys
import traceback
import warnings

from couplings import distributed
from couplings.checkpoint import CheckpointError
from couplings.cli.commands import COMMANDS
from couplings.cli.parser import TRAIN_FLAGS, build_parser
from couplings.config import ConfigError
from couplings.data import DatasetError
from couplings.rundir import RunDirBusy
from couplings.training import StoppedBySignal, TrainingError

__all__ = ["TRAIN_FLAGS", "build_parser", "main"]

# Errors that are the user's input or environment, reported as one line without a traceback:
# usage errors exit with 2, runtime errors with 1.
USAGE_ERRORS = (ConfigError,)
RUNTIME_ERRORS = (ArithmeticError, CheckpointError, DatasetError, distributed.DistributedError, RunDirBusy, TrainingError,
                  OSError, ValueError)



def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _warning_line  # one plain line, like the errors
    parser = build_parser()
    args = parser.parse_args(argv)
    rank = f"rank {distributed.rank()}: " if distributed.world_size() > 1 else ""  # under torchrun, whose line it is
    try:
        return COMMANDS[args.command](args)
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

