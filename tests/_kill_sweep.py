"""The kill sweep that tests/test_write_faults.py runs on one process and tests/test_distributed.py
under torchrun: SIGKILLs at random moments of one tiny run whose every write pauses half-way (so
that many land inside a checkpoint, metrics or sample write), each followed by ``--resume``."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def checkpoints_written(log: Path) -> int:
    """How many checkpoint writes a child's stderr marks (a new run's first one is of step 0)."""
    text = log.read_text()
    return text.count("inside a write of last.pt") + text.count("inside a write of best.pt")


def sweep(start: Callable[[bool, Path], subprocess.Popen], kill: Callable[[subprocess.Popen], None], run: Path,
          log: Path, kills: int, *, timeout: float) -> str:
    """Starts the training (``start(resume, log)``, its stderr into ``log``) and kills it with
    ``kill`` at a random moment after its first step, ``kills`` times, resuming after each; a run
    that ends before the sweep does is started again from scratch. Returns the line to print
    (with the random seed, to replay a failure); the caller checks ``run`` against a run never
    killed."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    killed, inside, starts, runs = 0, 0, 0, 1
    while True:
        process = start(starts > 0, log)
        starts += 1
        if killed < kills:
            deadline = time.monotonic() + timeout
            while checkpoints_written(log) < (2 if starts == 1 else 1) and process.poll() is None:  # a step is done
                assert time.monotonic() < deadline, f"seed {seed}: training did not start: {log.read_text()[-2000:]}"
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.4))
            if process.poll() is None:
                kill(process)
                process.wait()
                killed += 1
                markers = [line for line in log.read_text().splitlines() if line.startswith("couplings-test:")]
                inside += bool(markers) and "inside a write" in markers[-1]
                continue
        assert process.wait(timeout=2 * timeout) == 0, f"seed {seed}: {log.read_text()[-2000:]}"
        if killed >= kills:
            break
        shutil.rmtree(run)  # the run ended before the sweep did: another one, from the start
        starts, runs = 0, runs + 1
    return (f"seed {seed}, {killed} kills ({inside} inside a write) over {runs} run(s), "
            f"{starts} starts of the last one; runs lost: 0")
