"""`make demo`, read without running it (`make -n`): every model it trains is in its report beside
the shipped model of its kind, each training is on one CPU thread with the stated budget, and every
option it sets is one the model has."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from couplings import checkpoint
from couplings.cli import main

ROOT = Path(__file__).resolve().parents[1]


def demo_commands() -> list[list[str]]:
    if shutil.which("make") is None:
        pytest.skip("needs make")
    text = subprocess.run(["make", "-n", "--no-print-directory", "demo", "DEMO_MINUTES=7"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout
    return [shlex.split(line) for line in text.replace("\\\n", " ").splitlines() if "couplings" in line]


def test_make_demo_reports_every_model_it_trains_each_on_one_thread():
    commands = demo_commands()
    trains = [c for c in commands if len(c) > 3 and c[2] == "train"]
    assert {c[3] for c in trains} == {"nice", "realnvp", "glow", "latent-realnvp"}
    compare = next(c for c in commands if c[0].endswith("couplings") and c[1] == "compare")
    outs = [c[c.index("--out") + 1] for c in trains]
    compared = compare[2:compare.index("--out")]
    shipped = [r.removeprefix("pretrained:") for r in compared if r.startswith("pretrained:")]
    assert sorted(outs) == sorted(r for r in compared if not r.startswith("pretrained:"))  # the runs it trains
    # one shipped model per model it trains, of the same model and conditioning
    kinds = [(c[3], "num_classes=10" in c or c[3] == "latent-realnvp") for c in trains]
    shipped_kinds = []
    for name in shipped:
        state = checkpoint.load(checkpoint.pretrained_path(name))
        shipped_kinds.append((state.model, state.model_config.get("num_classes", 0) > 0))
    assert sorted(kinds) == sorted(shipped_kinds)
    for c in trains:
        assert c[0] == "OMP_NUM_THREADS=1" and c[c.index("--device") + 1] == "cpu"
        if c[3] != "latent-realnvp":  # the pixel-space models train for DEMO_MINUTES each
            assert c[c.index("--max-minutes") + 1] == "7"


def test_every_option_the_demo_sets_is_one_its_model_has(capsys):
    for c in demo_commands():
        if len(c) > 3 and c[2] == "train":
            sets = [a for i, a in enumerate(c) if i and c[i - 1] == "--set"]
            assert main(["config", c[3], *[x for s in sets for x in ("--set", s)]]) == 0, c
    capsys.readouterr()
