"""`couplings compare`: runs evaluated side by side, written up as a report a person can look at.

`compare` writes into one directory:

- ``report.md`` and ``report.html``: the same content; the HTML file is self-contained (figures
  embedded as data URIs, no scripts, no network), so it can be mailed or opened offline;
- ``curves.png``, ``samples-*.png``, ``interpolation-*.png`` and ``ood.png``: the figures.

Each run's test evaluation is read from its ``eval.json`` when that is current (newer than the
checkpoint, with as many samples as asked for) and computed and stored there otherwise. Runs that
differ only in their seed form one row, with mean +- standard deviation.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from couplings.hardware import describe
from couplings.report.collect import (
    PRETRAINED_PREFIX,
    Report,
    RunSummary,
    as_run_directory,
    evaluate_in_parallel,
    summarize_run,
)
from couplings.report.figures import TEMPERATURES, plot_curves, plot_ood
from couplings.report.render import write
from couplings.report.table import HEADERS, table

__all__ = ["TEMPERATURES", "Report", "RunSummary", "compare", "summarize_run"]


def compare(
    runs: list[str | Path],
    out: str | Path,
    *,
    samples: int = 10_000,
    draws: int = 3,
    test_images: int | None = None,
    ood_images: int | None = None,
    ood_dataset: str | None = None,
    jobs: int = 1,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Report:
    """Evaluates ``runs`` and writes ``report.md``, ``report.html`` and the figures into ``out``.
    A run is a run directory, or ``pretrained:NAME`` for a shipped model (copied into
    ``out/pretrained-NAME`` and evaluated there like a run).

    Args:
        samples: Samples per run for FID/KID/precision/recall (0 skips them).
        draws: Dequantization draws for the spread of test bits/dim (seeds 0..draws-1).
        test_images: Score every run on the first that many test images (None: all of them).
        ood_images: Test images per dataset for the out-of-distribution histogram (None: all).
        ood_dataset: The other dataset for that histogram (default: Fashion-MNIST for MNIST runs
            and the reverse).
        jobs: On the CPU, how many runs to evaluate at a time, each in a process with its share of
            the threads (the figures and timings then follow one run at a time).
    """
    from couplings import __version__

    if not runs:
        raise ValueError("compare needs at least one run directory")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, found {draws}")
    device = torch.device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    directories = [as_run_directory(run, out) for run in runs]
    if device.type == "cpu":
        evaluate_in_parallel(directories, jobs, samples=samples, draws=draws, test_images=test_images)
    summaries = [
        summarize_run(directory, out, index, samples=samples, draws=draws, device=device, test_images=test_images,
                      ood_dataset=ood_dataset, ood_images=ood_images, progress=progress)
        for index, directory in enumerate(directories)
    ]
    for run, summary in zip(runs, summaries):
        if str(run).startswith(PRETRAINED_PREFIX):
            summary.pretrained = str(run).removeprefix(PRETRAINED_PREFIX)
    for stale in ("curves.png", "ood.png"):
        (out / stale).unlink(missing_ok=True)
    plot_curves(summaries, out / "curves.png")
    plot_ood(summaries, out / "ood.png")
    report = Report(summaries, HEADERS, table(summaries), out)
    meta = {"samples": samples, "draws": draws, "test_images": test_images, "device": describe(device), "version": __version__,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    write(report, meta)
    return report
