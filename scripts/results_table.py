"""Prints the README's results table (markdown) from run directories' eval.json and metrics.jsonl.

    python scripts/results_table.py runs/nice-mnist-paper runs/latent-realnvp-mnist
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _stage_seconds(run: Path) -> str:
    """Wall-clock per training stage, from the cumulative 'elapsed' of each metrics line."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ends: dict[str, float] = {}
    for line in lines:
        ends[line.get("stage", "train")] = line["elapsed"]
    parts, previous = [], 0.0
    for stage, end in ends.items():
        parts.append(f"{stage} {(end - previous) / 60:.1f} min")
        previous = end
    return ", ".join(parts)


def _fmt(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def main(runs: list[str]) -> None:
    print("| run | model | params | epochs | training wall-clock | test bits/dim | FID | KID | precision / recall "
          "| conditional accuracy | nearest-train L2 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in runs:
        run = Path(name)
        result = json.loads((run / "eval.json").read_text())["test"]
        quality = result.get("sample_quality", {})
        bpd = (f"{result['bits_per_dim']:.3f}" if result["bits_per_dim"] is not None
               else result["bits_per_dim_note"])
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        epochs = ", ".join(f"{stage} {max(m['epoch'] for m in metrics if m.get('stage', 'train') == stage)}"
                           for stage in dict.fromkeys(m.get("stage", "train") for m in metrics))
        print(f"| `{run.name}` | {result['model']} | {result['parameters']:,} | {epochs} | {_stage_seconds(run)} | {bpd} "
              f"| {_fmt(quality.get('fid'), 2)} | {_fmt(quality.get('kid'), 4)} "
              f"| {_fmt(quality.get('precision'), 3)} / {_fmt(quality.get('recall'), 3)} "
              f"| {_fmt(quality.get('conditional_accuracy'), 3)} | {_fmt(quality.get('nearest_train_l2'), 2)} |")
    hardware = {json.loads((Path(r) / "eval.json").read_text())["test"]["training_hardware"] for r in runs}
    print(f"\nTraining hardware: {'; '.join(sorted(h for h in hardware if h))}. "
          "FID/KID/precision/recall on the features of the project's MNIST classifier (not Inception).")


if __name__ == "__main__":
    main(sys.argv[1:])
