"""Validation bits/dim against minutes of *training* time (evaluation excluded), as JSONL and a plot.

    python benchmarks/learning_curve.py realnvp --set size=fast --minutes 25 --threads 1 \\
        --eval-every 60 --out results/curves/realnvp-fast.jsonl
    python benchmarks/learning_curve.py plot results/curves/*.jsonl -o results/curves/curves.png

A run trains exactly as `couplings train` does (the same `Stage` of the pixel trainer: the same
`train_pass` step, objective, schedule and EMA), in segments of ``--eval-every`` seconds of training time; between segments the clock
stops and the validation bits/dim of a fixed subset (the first ``--val-images`` validation
images, dequantization seed 0, the EMA weights when the run keeps them) is written as one JSON
line. The plot shows every curve given and, for reference, the UvA tutorial 11 flow measured on
one thread of a 2-core AMD EPYC (docs/references.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from couplings import checkpoint
from couplings.config import split_overrides
from couplings.hardware import describe
from couplings.models import MODELS
from couplings.rundir import RunDir
from couplings.training import plan_run
from couplings.training.faults import FaultCounter
from couplings.training.loop import (
    Budget,
    Console,
    Context,
    TrainState,
    start_pass,
    train_pass,
)
from couplings.training.pixel import pixel_stage

sys.path.insert(0, str(Path(__file__).parent))
from tutorial_flow import TUTORIAL_RECIPE, TutorialFlow  # noqa: E402

# The tutorial's own code on one thread of a 2-core AMD EPYC (docs/references.md): validation
# bits/dim (2,000 images, one draw) after so many minutes of training.
TUTORIAL = {5: 1.41, 10: 1.36, 15: 1.30, 20: 1.28, 25: 1.27}


def learning_curve(model_name: str, overrides: list[str], *, minutes: float, eval_every: float,
                   val_images: int, label: str, out: Path, eval_batch: int = 100, progress: bool = False,
                   save: Path | None = None) -> list[dict]:
    tutorial = model_name == "tutorial"  # the UvA tutorial flow, trained as a Real NVP run with its recipe
    trainer = "realnvp" if tutorial else model_name
    entry = MODELS[trainer]
    size, model_overrides, train_overrides = split_overrides(
        [*TUTORIAL_RECIPE, *overrides] if tutorial else overrides, entry.config, entry.train_config, trainer)
    if tutorial and model_overrides:
        raise SystemExit(f"the tutorial flow takes training options only, found {sorted(model_overrides)}")
    with tempfile.TemporaryDirectory() as scratch:
        plan = plan_run(trainer, Path(scratch) / "run", train_overrides=train_overrides,
                        model_overrides=model_overrides, size=size)
        cfg, model, device = plan.cfg, (TutorialFlow() if tutorial else plan.model_object), torch.device("cpu")
        cfg.eval_batch_size = eval_batch
        ctx = Context({**plan.record(), "hardware": describe(device)}, cfg, model.train(), device, plan.train_data, plan.val_data, None,
                      RunDir(Path(scratch) / "run"), Budget(None, None), FaultCounter(cfg.max_bad_steps), Console(progress))
        # `couplings train`'s stage, validated on the first val_images images with dequantization seed 0.
        stage = pixel_stage(ctx, val_images=val_images, val_seed=0)
        common = {"label": label, "model": model_name, "overrides": overrides, "size": plan.size,
                  "parameters": sum(p.numel() for p in model.parameters()), "hardware": describe(device),
                  "threads": torch.get_num_threads(), "val_images": min(val_images, len(plan.val_data[0]))}
        records, trained, state = [], 0.0, TrainState()
        this = start_pass(stage.examples, 1, cfg, device, None)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as log:
            while trained < 60 * minutes:
                segment = min(eval_every, 60 * minutes - trained)
                ctx.budget = Budget(None, segment / 60)
                started = time.perf_counter()
                while not ctx.budget.spent(state.step):
                    if this.complete:
                        this = start_pass(stage.examples, this.index + 1, cfg, device, None)
                    train_pass(ctx, stage, this, state, postfix=lambda nll: "")
                trained += time.perf_counter() - started
                model.eval()
                with stage.ema.applied(model) if stage.ema is not None else nullcontext():
                    val_bpd = stage.validate()["val_bpd"]
                model.train()
                record = {**common, "train_seconds": round(trained, 1), "step": state.step, "epochs": round(
                    state.step * cfg.batch_size / stage.examples, 3), "val_bpd": val_bpd}
                records.append(record)
                log.write(json.dumps(record) + "\n")
                log.flush()
                print(f"{label}: {trained / 60:5.1f} min, step {state.step}, val {val_bpd:.4f} bits/dim", file=sys.stderr)
        if save is not None:  # the final weights (and averages) as a checkpoint that eval and sample read
            if tutorial:
                raise SystemExit("--save needs a model of the registry, not the tutorial flow")
            state.epoch = state.step * cfg.batch_size // stage.examples
            ctx.budget = Budget(None, None, already=trained)  # the checkpoint's clock: training time
            checkpoint.save(ctx.snapshot(state, stage), save)
    return records


def plot(paths: list[Path], output: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for path in paths:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if records:
            cpu = records[0]["hardware"].removeprefix("CPU: ").split(" (")[0]
            ax.plot([r["train_seconds"] / 60 for r in records], [r["val_bpd"] for r in records], marker=".",
                    label=f"{records[0]['label']} ({records[0]['parameters']:,} parameters; {cpu})")
    ax.plot(list(TUTORIAL), list(TUTORIAL.values()), "k*", markersize=10,
            label="UvA tutorial 11 flow, its own code (AMD EPYC, docs/references.md)")
    ax.set(xlabel="training time (min, evaluation excluded)", ylabel="validation bits/dim", ylim=(1.0, 2.5),
           title="Learning curves on one CPU thread")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    return output


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plot"]:
        p = argparse.ArgumentParser(prog="learning_curve.py plot")
        p.add_argument("curves", type=Path, nargs="+")
        p.add_argument("-o", "--output", type=Path, required=True)
        args = p.parse_args(argv[1:])
        print(plot(args.curves, args.output))
        return 0
    p = argparse.ArgumentParser(prog="learning_curve.py", description=__doc__.split("\n")[0])
    p.add_argument("model", choices=[*(m for m, e in MODELS.items() if e.trainer == "pixel"), "tutorial"],
                   help="a pixel-space model, or 'tutorial': the UvA tutorial 11 flow rebuilt (tutorial_flow.py)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--minutes", type=float, default=25.0, help="minutes of training time")
    p.add_argument("--eval-every", type=float, default=60.0, help="seconds of training between evaluations")
    p.add_argument("--val-images", type=int, default=2000)
    p.add_argument("--eval-batch", type=int, default=100, help="images per evaluation batch (small ones are faster on CPU)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--label", help="the curve's name (default: the model and its --set options)")
    p.add_argument("--out", type=Path, required=True, help="JSONL file")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--save", type=Path, help="write the final model here as a checkpoint (for couplings eval / sample)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    label = args.label or " ".join([args.model, *args.overrides])
    records = learning_curve(args.model, args.overrides, minutes=args.minutes, eval_every=args.eval_every,
                             val_images=args.val_images, label=label, out=args.out, eval_batch=args.eval_batch,
                             progress=args.progress, save=args.save)
    print(json.dumps({"label": label, "final_val_bpd": records[-1]["val_bpd"] if records else math.nan}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
