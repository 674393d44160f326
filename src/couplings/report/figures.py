"""The report's figures: training curves, samples per temperature, interpolations, and
out-of-distribution histograms."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from couplings.data import with_channels
from couplings.files import atomic_write
from couplings.images import save_grid
from couplings.likelihood import dequantize
from couplings.sampling import interpolate, sample_labels

if TYPE_CHECKING:
    from couplings.report.collect import RunSummary

__all__ = ["TEMPERATURES", "plot_curves", "plot_ood", "sample_figures"]

TEMPERATURES = (0.5, 0.7, 0.85, 1.0)


def plot_curves(runs: list[RunSummary], path: Path) -> Path | None:
    """Validation bits/dim against epoch and against wall-clock, every pixel-space run."""
    import matplotlib.pyplot as plt

    curves = [(r, [h for h in r.history if "val_bpd" in h]) for r in runs if r.has_pixel_density]
    curves = [(r, h) for r, h in curves if h]
    if not curves:
        return None
    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for run, history in curves:
        full = [h for h in history if not h.get("partial_epoch")]
        steps_per_epoch = full[0]["step"] / full[0]["epoch"] if full else history[-1]["step"]
        epochs = [h["step"] / steps_per_epoch for h in history]
        minutes = [h["elapsed"] / 60 for h in history]
        values = [h["val_bpd"] for h in history]
        by_epoch.plot(epochs, values, marker=".", label=run.name)
        by_time.plot(minutes, values, marker=".", label=run.name)
    by_epoch.set(xlabel="epoch", ylabel="validation bits/dim", title="against epochs")
    by_time.set(xlabel="training wall-clock (min)", title="against wall-clock")
    for ax in (by_epoch, by_time):
        ax.grid(alpha=0.3)
    by_time.legend(fontsize=8)
    return _save(fig, path)


def plot_ood(runs: list[RunSummary], path: Path) -> Path | None:
    """Histograms of per-image test bits/dim, in distribution against out of distribution."""
    import matplotlib.pyplot as plt

    panels = [r for r in runs if r.ood]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, run in zip(axes[0], panels):
        ood = run.ood
        both = np.array(ood["in"] + ood["out"])
        bins = np.linspace(*np.percentile(both, [0.5, 99.5]), 60)  # the far tails would squash the rest
        ax.hist(np.clip(ood["in"], bins[0], bins[-1]), bins=bins, alpha=0.6, density=True,
                label=f"{ood['dataset']} (trained on)")
        ax.hist(np.clip(ood["out"], bins[0], bins[-1]), bins=bins, alpha=0.6, density=True, label=ood["ood_dataset"])
        ax.set(xlabel="test bits/dim per image", title=run.name)
        ax.legend(fontsize=8)
    return _save(fig, path)


@torch.inference_mode()
def sample_figures(model, run: RunSummary, images, out: Path, index: int, device: torch.device,
                    per_row: int = 8) -> dict[str, Path]:
    """One row of samples per temperature, from the same noise; an interpolation strip
    between test images for invertible pixel models."""
    rows = []
    for t in TEMPERATURES:
        generator = torch.Generator(device=device).manual_seed(0)
        rows.append(model.sample(per_row, sample_labels(model, per_row), temperature=t, generator=generator))
    figures = {"samples": save_grid(torch.cat(rows).float().cpu(), out / f"samples-{index}-{run.name}.png", nrow=per_row)}
    if run.has_pixel_density and not model.conditional:
        generator = torch.Generator(device=device).manual_seed(0)
        x = dequantize(torch.as_tensor(with_channels(images[:4])).to(device), generator, model.prior.dtype)
        strip = interpolate(model, x[:2], x[2:4], steps=per_row)
        figures["interpolation"] = save_grid(strip.float().cpu(), out / f"interpolation-{index}-{run.name}.png",
                                             nrow=per_row)
    return figures


def _save(fig, path: Path) -> Path:
    """Writes a matplotlib figure as a PNG (`couplings.files.atomic_write`) and closes it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
