"""The report's tables: one row per recipe (seeds aggregated), shown as a quality table and a
cost table, and the published anchors."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from couplings.evaluation import NO_PIXEL_BPD
from couplings.likelihood import nats_to_bits_per_dim
from couplings.models import PUBLISHED

if TYPE_CHECKING:
    from couplings.report.collect import RunSummary

__all__ = ["CONVERSION", "COST", "HEADERS", "QUALITY", "against_pretrained", "columns", "published_anchors",
           "published_gaps", "table"]


HEADERS = [
    "run", "model", "dataset", "parameters", "test bits/dim", "test log-likelihood (nats)",
    "bits/dim std over dequantization draws", "FID", "KID", "conditional accuracy", "nearest-train L2",
    "training wall-clock", "epochs", "training hardware", "training images/s", "sampling s / 64 images",
    "inference s / 64 images",
]


# The two tables the report shows (one wide table of every column scrolls sideways): what the
# models reach, and what they cost. Each starts with the run's name.
QUALITY = ["run", "model", "dataset", "test bits/dim", "test log-likelihood (nats)", "bits/dim std over dequantization draws",
           "FID", "KID", "conditional accuracy", "nearest-train L2"]
COST = ["run", "parameters", "training wall-clock", "epochs", "training hardware", "training images/s",
        "sampling s / 64 images", "inference s / 64 images"]
assert set(QUALITY) | set(COST) == set(HEADERS)


def columns(rows: list[list[str]], names: list[str]) -> list[list[str]]:
    """The cells of ``rows`` (in `HEADERS` order) under the headers ``names``."""
    index = [HEADERS.index(name) for name in names]
    return [[row[i] for i in index] for row in rows]


def _epochs(history: list[dict]) -> str:
    stages = {}
    for line in history:
        stages[line.get("stage", "train")] = line["epoch"]
    if len(stages) <= 1:
        return str(next(iter(stages.values()), "n/a"))
    return ", ".join(f"{stage} {epoch}" for stage, epoch in stages.items())


def _values(run: RunSummary) -> dict:
    """The row of one run: numbers where they apply, otherwise the reason they do not."""
    result, history = run.result, run.history
    quality = result.sample_quality
    if quality is None:
        no_quality = "not computed (--samples 0)"
    elif "skipped" in quality:
        no_quality = f"skipped: no feature classifier for {result.dataset}"
    else:
        no_quality = None
    draws = result.bits_per_dim_draws or []
    speeds = [h["images_per_s"] for h in history if "images_per_s" in h]
    return {
        "run": run.name,
        "model": result.model,
        "dataset": result.dataset,
        "parameters": result.parameters,
        "test bits/dim": result.bits_per_dim if run.has_pixel_density else NO_PIXEL_BPD,
        "test log-likelihood (nats)": NO_PIXEL_BPD if result.log_likelihood_nats is None else result.log_likelihood_nats,
        "bits/dim std over dequantization draws": (
            statistics.stdev(draws) if len(draws) > 1 else
            NO_PIXEL_BPD if not run.has_pixel_density else "one draw"),
        "FID": no_quality or quality["fid"],
        "KID": no_quality or quality["kid"],
        "conditional accuracy": no_quality or quality.get("conditional_accuracy", "unconditional model"),
        "nearest-train L2": no_quality or quality["nearest_train_l2"],
        # a shipped model has no metrics.jsonl; its checkpoint says how long it trained
        "training wall-clock": (history[-1]["elapsed"] / 60 if history else
                                result.training_seconds / 60 if result.training_seconds else "no metrics.jsonl"),
        "epochs": _epochs(history) if history else result.epoch or "n/a",
        "training hardware": run.config.get("hardware") or "unknown",
        "training images/s": statistics.median(speeds) if speeds else "no metrics.jsonl",
        "sampling s / 64 images": run.seconds_per_64["sampling"],
        "inference s / 64 images": run.seconds_per_64["inference"],
    }


_FORMATS = {
    "parameters": "{:,.0f}", "test bits/dim": "{:.3f}", "test log-likelihood (nats)": "{:.1f}",
    "bits/dim std over dequantization draws": "{:.4f}", "FID": "{:.2f}", "KID": "{:.4f}",
    "conditional accuracy": "{:.3f}", "nearest-train L2": "{:.2f}", "training wall-clock": "{:.1f} min",
    "training images/s": "{:.0f}", "sampling s / 64 images": "{:.4f}", "inference s / 64 images": "{:.4f}",
}


def _cell(header: str, values: list) -> str:
    """One cell from the values of a row's runs: a number, mean +- std over seeds, or the reason."""
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    fmt = _FORMATS.get(header, "{}")
    if len(numbers) == len(values) and numbers:
        if len(numbers) == 1:
            return fmt.format(numbers[0])
        mean, std = statistics.mean(numbers), statistics.stdev(numbers)
        return f"{fmt.format(mean)} ± {fmt.format(std).replace(' min', '')}"
    texts = list(dict.fromkeys(str(v) for v in values))
    return ", ".join(texts)


def _recipes(runs: list[RunSummary]) -> list[list[RunSummary]]:
    """Runs grouped by recipe (seeds of one recipe together), in the order first seen."""
    groups: dict[str, list[RunSummary]] = {}
    for run in runs:
        groups.setdefault(run.group_key(), []).append(run)
    return list(groups.values())


def table(runs: list[RunSummary]) -> list[list[str]]:
    """Rows of formatted cells; runs of one recipe that differ only in the seed share a row."""
    rows = []
    for members in _recipes(runs):
        values = [_values(run) for run in members]
        row = [_cell(h, [v[h] for v in values]) for h in HEADERS]
        if len(members) > 1:
            seeds = ", ".join(str(r.config.get("train", {}).get("seed")) for r in members)
            row[0] = f"{row[0]} (mean ± std over {len(members)} seeds: {seeds})"
        rows.append(row)
    return rows


def published_gaps(runs: list[RunSummary]) -> list[str]:
    """One line per recipe: how far its test bits/dim is from its model's published MNIST figure
    (the mean over seeds), or why there is nothing to compare with."""
    lines = []
    for members in _recipes(runs):
        first = members[0].result
        name = members[0].name + (f" and {len(members) - 1} more seeds" if len(members) > 1 else "")
        if not first.has_pixel_density:
            lines.append(f"{name} ({first.model}): no published figure to compare with; its likelihood is of "
                         f"{first.latent_dimensions or 'the'}-d embeddings, not of pixels")
        elif first.published_bits_per_dim is None:
            lines.append(f"{name} ({first.model} on {first.dataset}): no published figure for this model "
                         f"on this dataset")
        else:
            ours = statistics.mean(r.result.bits_per_dim for r in members)
            published, gap = first.published_bits_per_dim, ours - first.published_bits_per_dim
            where = "above" if gap > 0 else "below"
            estimate = f", {first.estimate}" if first.estimate else ""
            conditional = members[0].config.get("model_config", {}).get("num_classes", 0) > 0
            caveat = ("; of p(x | y), the label given, against a published figure of p(x), so not like for like"
                      if conditional else "")
            lines.append(f"{name} ({first.model}): {ours:.3f} bits/dim{estimate}, against the published {published:.3f} "
                         f"({first.published_source}), {abs(gap):.3f} {where} it ({abs(gap) / published:.1%}){caveat}")
    return lines


def _kind(run: RunSummary) -> tuple:
    conditional = (run.config.get("model_config") or {}).get("num_classes", 0) > 0
    return run.result.model, run.result.dataset, conditional


def against_pretrained(runs: list[RunSummary]) -> list[str]:
    """One line per run that has a shipped model of its kind (model, dataset, conditioning) beside
    it in the report: how far its short training is from that long-trained model."""
    lines = []
    for run in runs:
        for shipped in (r for r in runs if r.pretrained and not run.pretrained and _kind(r) == _kind(run)):
            ours, theirs = _values(run), _values(shipped)
            if run.has_pixel_density:
                gap = ours["test bits/dim"] - theirs["test bits/dim"]
                density = f"test bits/dim {ours['test bits/dim']:.3f} against {theirs['test bits/dim']:.3f} ({gap:+.3f})"
            else:
                ours_nll, theirs_nll = run.result.latent_nll_nats, shipped.result.latent_nll_nats
                density = (f"latent NLL {ours_nll:.2f} against {theirs_nll:.2f} nats ({ours_nll - theirs_nll:+.2f}; "
                           "their autoencoders differ, so their latent densities are not of the same thing)")
            quality = (f", FID {ours['FID']:.1f} against {theirs['FID']:.1f}"
                       if all(isinstance(v["FID"], float) for v in (ours, theirs)) else "")
            minutes = [v["training wall-clock"] for v in (ours, theirs)]
            took = (f"{minutes[0]:.1f} against {minutes[1]:.0f} minutes of training"
                    if all(isinstance(m, float) for m in minutes) else "training times unknown")
            lines.append(f"{run.name} against the shipped {shipped.pretrained}: {density}{quality}; {took}")
    return lines


def published_anchors(dim: int = 784) -> list[list[str]]:
    """PUBLISHED as rows: the published number as given, the other unit converted (marked so)."""
    rows = []
    for p in PUBLISHED:
        if p.unit == "nats":
            bpd, nats = f"{p.bits_per_dim(dim):.3f} (converted)", f"{p.value:.2f}"
        else:
            bpd, nats = f"{p.value:.2f}", f"{p.nats(dim):.1f} (converted)"
        rows.append([p.name, bpd, nats, p.source])
    return rows


CONVERSION = ("bits/dim = 8 - log p(x) / (D ln 2), with log p(x) in nats of the density of the dequantized "
              "image x = (k + u) / 256 on [0, 1]^D and D = 784 for MNIST; so 1980.50 nats = "
              f"{nats_to_bits_per_dim(1980.50, 784):.3f} bits/dim.")

