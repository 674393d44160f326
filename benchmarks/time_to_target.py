"""Wall-clock until a run's validation bits/dim first reaches a target, from its metrics.jsonl.

    python benchmarks/time_to_target.py results/nice-mnist-paper:4.5 results/realnvp-small-mnist:1.3

One JSON line per run: whether and when (minutes of training wall-clock, epoch, step) the target
was reached, else the best value and when it was seen. Train a run for this with
``--set target_bpd=4.5``, which stops it at the first epoch that reaches the target.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def time_to_target(run: Path, target: float) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    records = [r for r in records if "val_bpd" in r]
    if not records:
        raise SystemExit(f"error: {run / 'metrics.jsonl'} has no validation bits/dim")
    config = json.loads((run / "config.json").read_text())
    common = {"run": str(run), "model": config["model"], "size": config["size"], "target_bpd": target,
              "hardware": config.get("hardware")}
    hit = next((r for r in records if r["val_bpd"] <= target), None)
    if hit is not None:
        return {**common, "reached": True, "minutes": round(hit["elapsed"] / 60, 1), "epoch": hit["epoch"],
                "step": hit["step"], "val_bpd": round(hit["val_bpd"], 4)}
    best = min(records, key=lambda r: r["val_bpd"])
    return {**common, "reached": False, "trained_minutes": round(records[-1]["elapsed"] / 60, 1),
            "best_val_bpd": round(best["val_bpd"], 4), "best_at_minutes": round(best["elapsed"] / 60, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR:TARGET")
    for spec in parser.parse_args().runs:
        run, _, target = spec.rpartition(":")
        print(json.dumps(time_to_target(Path(run), float(target))))


if __name__ == "__main__":
    main()
