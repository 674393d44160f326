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

import base64
import html
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from couplings import checkpoint, data
from couplings.evaluate import dequantize, log_probs, nats_to_bits_per_dim
from couplings.evaluation import NO_PIXEL_BPD, evaluate_checkpoint, update_eval_file
from couplings.hardware import describe
from couplings.images import save_grid
from couplings.sampling import interpolate

__all__ = ["TEMPERATURES", "Report", "RunSummary", "compare", "summarize_run"]

TEMPERATURES = (0.5, 0.7, 0.85, 1.0)
OOD_COUNTERPART = {"mnist": "fashion-mnist", "fashion-mnist": "mnist"}
# Training options that may differ between runs of one row (the seed, and budgets that only
# say how long a run was allowed to go on).
_NOT_RECIPE = ("seed", "epochs", "max_steps", "max_minutes")


@dataclass
class RunSummary:
    """Everything the report says about one run."""

    name: str
    path: Path
    config: dict  # config.json
    history: list[dict]  # metrics.jsonl
    result: dict  # the run's eval.json["test"], with the dequantization draws added
    seconds_per_64: dict[str, float]  # "sampling" and "inference", on the report's device
    ood: dict | None = None  # per-image bits/dim in and out of distribution
    figures: dict[str, Path] = field(default_factory=dict)

    @property
    def has_pixel_density(self) -> bool:
        return self.result.get("bits_per_dim") is not None

    def group_key(self) -> str:
        """Runs with the same key are seeds of one recipe."""
        recipe = {k: v for k, v in self.config.get("train", {}).items() if k not in _NOT_RECIPE}
        return json.dumps([self.config["model"], self.config.get("model_config"), recipe], sort_keys=True)


@dataclass
class Report:
    runs: list[RunSummary]
    headers: list[str]
    rows: list[list[str]]
    directory: Path


def _read_history(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _eval_is_current(entry: dict | None, run: Path, samples: int) -> bool:
    """A stored test evaluation counts if it scored this run's checkpoint, after the checkpoint
    was last written, with the number of samples asked for."""
    if not entry:
        return False
    ckpt = checkpoint.resolve(run)
    eval_file = run / "eval.json"
    quality = entry.get("sample_quality", {})
    drawn = quality.get("num_samples", 0) if "fid" in quality else 0
    return (
        Path(entry.get("checkpoint", "")).resolve() == ckpt.resolve()
        and eval_file.stat().st_mtime >= ckpt.stat().st_mtime
        and (drawn == samples or (samples == 0 and "sample_quality" not in entry) or "skipped" in quality)
    )


@torch.inference_mode()
def _seconds_per_64(fn, repeats: int = 5) -> float:
    """Median wall-clock of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _labels(model, n: int, device) -> torch.Tensor | None:
    config = getattr(model, "config", None)
    return torch.arange(n, device=device) % config.num_classes if getattr(config, "conditional", False) else None


def _log(message: str) -> None:
    print(f"compare: {message}", file=sys.stderr)


def summarize_run(
    run: Path,
    out: Path,
    index: int,
    *,
    samples: int,
    draws: int,
    device: torch.device,
    ood_dataset: str | None = None,
    ood_images: int | None = None,
    progress: bool = False,
) -> RunSummary:
    """Evaluates one run (or reuses its current ``eval.json``), times it on ``device`` and draws
    its figures into ``out``."""
    run = Path(run)
    config_file = run / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run} has no config.json; expected a run directory written by 'couplings train'")
    config = json.loads(config_file.read_text())
    stored = json.loads((run / "eval.json").read_text()) if (run / "eval.json").is_file() else {}
    result = stored.get("test")
    if not _eval_is_current(result, run, samples):
        _log(f"evaluating {run} on the test set ({samples} samples)")
        result = evaluate_checkpoint(run, samples=samples, device=device, progress=progress)
    model, _ = checkpoint.load_model(run, device)
    images, labels = data.load(result["dataset"], "test")
    if result.get("bits_per_dim") is not None and len(result.get("bits_per_dim_draws", [])) < draws:
        _log(f"{run}: test bits/dim under {draws} dequantization draws")
        result["bits_per_dim_draws"] = [
            result["bits_per_dim"] if seed == 0 else
            nats_to_bits_per_dim(float(log_probs(model, images, seed=seed).mean()), result["dimensions"])
            for seed in range(draws)
        ]
    update_eval_file(run, "test", result)

    _log(f"{run}: timings and figures")
    x = torch.as_tensor(images[:64]).unsqueeze(1).to(device)  # (64, 1, H, W) uint8
    x = dequantize(x, torch.Generator(device=device).manual_seed(0), model.prior.dtype)
    conditional = _labels(model, 1, device) is not None
    y = torch.as_tensor(labels[:64]).long().to(device) if conditional else None
    generator = torch.Generator(device=device).manual_seed(0)
    timing = {
        "sampling": _seconds_per_64(lambda: model.sample(64, _labels(model, 64, device), generator=generator)),
        "inference": _seconds_per_64(lambda: model.log_prob(x, y)),
    }
    summary = RunSummary(run.name, run, config, _read_history(run), result, timing)
    summary.figures = _sample_figures(model, summary, images, out, index, device)
    other = ood_dataset or OOD_COUNTERPART.get(result["dataset"])
    if summary.has_pixel_density and other:
        summary.ood = _ood_bits_per_dim(model, result["dataset"], other, ood_images)
    return summary


def _ood_bits_per_dim(model, dataset: str, ood_dataset: str, n: int | None) -> dict:
    """Per-image test bits/dim of ``model`` on its own dataset and on another one."""
    out = {"dataset": dataset, "ood_dataset": ood_dataset}
    for key, name in (("in", dataset), ("out", ood_dataset)):
        images, _ = data.load(name, "test")
        images = images[:n] if n else images
        dim = math.prod(images.shape[1:])
        out[key] = [nats_to_bits_per_dim(v, dim) for v in log_probs(model, images).tolist()]
    return out


def _plot_curves(runs: list[RunSummary], path: Path) -> Path | None:
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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_ood(runs: list[RunSummary], path: Path) -> Path | None:
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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@torch.inference_mode()
def _sample_figures(model, run: RunSummary, images, out: Path, index: int, device: torch.device,
                    per_row: int = 8) -> dict[str, Path]:
    """One row of samples per temperature, from the same noise; an interpolation strip
    between test images for invertible pixel models."""
    rows = []
    for t in TEMPERATURES:
        generator = torch.Generator(device=device).manual_seed(0)
        rows.append(model.sample(per_row, _labels(model, per_row, device), temperature=t, generator=generator))
    figures = {"samples": save_grid(torch.cat(rows).float().cpu(), out / f"samples-{index}-{run.name}.png", nrow=per_row)}
    if run.has_pixel_density:
        generator = torch.Generator(device=device).manual_seed(0)
        x = dequantize(torch.as_tensor(images[:4]).unsqueeze(1).to(device), generator, model.prior.dtype)
        strip = interpolate(model, x[:2], x[2:4], steps=per_row)
        figures["interpolation"] = save_grid(strip.float().cpu(), out / f"interpolation-{index}-{run.name}.png",
                                             nrow=per_row)
    return figures


# ---- the table -----------------------------------------------------------------------------

HEADERS = [
    "run", "model", "dataset", "parameters", "test bits/dim", "test log-likelihood (nats)",
    "bits/dim std over dequantization draws", "FID", "KID", "conditional accuracy", "nearest-train L2",
    "training wall-clock", "epochs", "training hardware", "training images/s", "sampling s / 64 images",
    "inference s / 64 images",
]


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
    quality = result.get("sample_quality")
    if quality is None:
        no_quality = "not computed (--samples 0)"
    elif "skipped" in quality:
        no_quality = f"skipped: no feature classifier for {result['dataset']}"
    else:
        no_quality = None
    draws = result.get("bits_per_dim_draws", [])
    speeds = [h["images_per_s"] for h in history if "images_per_s" in h]
    return {
        "run": run.name,
        "model": result["model"],
        "dataset": result["dataset"],
        "parameters": result["parameters"],
        "test bits/dim": result["bits_per_dim"] if run.has_pixel_density else NO_PIXEL_BPD,
        "test log-likelihood (nats)": result.get("log_likelihood_nats", NO_PIXEL_BPD),
        "bits/dim std over dequantization draws": (
            statistics.stdev(draws) if len(draws) > 1 else
            NO_PIXEL_BPD if not run.has_pixel_density else "one draw"),
        "FID": no_quality or quality["fid"],
        "KID": no_quality or quality["kid"],
        "conditional accuracy": no_quality or quality.get("conditional_accuracy", "unconditional model"),
        "nearest-train L2": no_quality or quality["nearest_train_l2"],
        "training wall-clock": history[-1]["elapsed"] / 60 if history else "no metrics.jsonl",
        "epochs": _epochs(history),
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


def table(runs: list[RunSummary]) -> list[list[str]]:
    """Rows of formatted cells; runs of one recipe that differ only in the seed share a row."""
    groups: dict[str, list[RunSummary]] = {}
    for run in runs:
        groups.setdefault(run.group_key(), []).append(run)
    rows = []
    for members in groups.values():
        values = [_values(run) for run in members]
        row = [_cell(h, [v[h] for v in values]) for h in HEADERS]
        if len(members) > 1:
            seeds = ", ".join(str(r.config.get("train", {}).get("seed")) for r in members)
            row[0] = f"{row[0]} (mean ± std over {len(members)} seeds: {seeds})"
        rows.append(row)
    return rows


# The published MNIST test figures (dequantized, D = 784), each in the unit its source gives it.
PUBLISHED = [
    ("NICE", "nats", 1980.50, "NICE paper table (Dinh et al., 2014)"),
    ("MAF (5)", "bits/dim", 1.89, "FFJORD paper table"),
    ("Real NVP (multi-scale)", "bits/dim", 1.06, "FFJORD paper table"),
    ("Glow", "bits/dim", 1.05, "FFJORD paper table"),
    ("FFJORD (multi-scale)", "bits/dim", 0.99, "FFJORD paper"),
    ("Residual Flows", "bits/dim", 0.97, "Residual Flows paper"),
]


def published_anchors(dim: int = 784) -> list[list[str]]:
    """PUBLISHED as rows: the published number as given, the other unit converted (marked so)."""
    rows = []
    for name, unit, value, source in PUBLISHED:
        if unit == "nats":
            bpd, nats = f"{nats_to_bits_per_dim(value, dim):.3f} (converted)", f"{value:.2f}"
        else:
            bpd, nats = f"{value:.2f}", f"{(8 - value) * dim * math.log(2):.1f} (converted)"
        rows.append([name, bpd, nats, source])
    return rows


CONVERSION = ("bits/dim = 8 - log p(x) / (D ln 2), with log p(x) in nats of the density of the dequantized "
              "image x = (k + u) / 256 on [0, 1]^D and D = 784 for MNIST; so 1980.50 nats = "
              f"{nats_to_bits_per_dim(1980.50, 784):.3f} bits/dim.")


# ---- writing -------------------------------------------------------------------------------

def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(headers: list[str], rows: list[list[str]], table_id: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="wide"><table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; padding: 0 1rem; }
.wide { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
img { max-width: 100%; image-rendering: pixelated; }
figure { display: inline-block; margin: 0.5rem 1rem 1rem 0; vertical-align: top; }
figcaption { font-size: 0.85rem; color: #555; }
.note { color: #555; font-size: 0.9rem; }
"""


def _sections(report: Report, meta: dict) -> list[tuple[str, list]]:
    """The report as (title, parts); a part is text, a table (headers, rows, id) or a figure (path, caption)."""
    runs = report.runs
    sections = [
        ("Results", [
            f"Test set of each run's dataset. Sample metrics use {meta['samples']} samples at temperature 1.0 on "
            f"the features of the project's own classifier (not Inception; they compare only with each other). "
            f"Spread: standard deviation of test bits/dim over {meta['draws']} dequantization draws. Timings "
            f"(median of 5 after a warm-up) on {meta['device']}.",
            (HEADERS, report.rows, "results"),
        ]),
        ("Published anchors", [CONVERSION, (["model", "test bits/dim", "test log-likelihood (nats)", "source"],
                                            published_anchors(), "anchors")]),
    ]
    curves = report.directory / "curves.png"
    if curves.is_file():
        sections.append(("Training curves", [(curves, "validation bits/dim against epochs and against wall-clock")]))
    samples = [(r.figures["samples"], f"{r.name}: one row per temperature {', '.join(map(str, TEMPERATURES))}")
               for r in runs if "samples" in r.figures]
    sections.append(("Samples", samples))
    strips = [(r.figures["interpolation"], f"{r.name}: latent interpolation between test images")
              for r in runs if "interpolation" in r.figures]
    if strips:
        sections.append(("Interpolations", strips))
    ood = report.directory / "ood.png"
    if ood.is_file():
        lines = [_ood_summary(r) for r in runs if r.ood]
        sections.append(("Out-of-distribution likelihoods", [
            "The well-known surprise (Nalisnick et al., 2019): a flow trained on Fashion-MNIST gives MNIST digits "
            "higher likelihood than its own test images, so likelihood alone is a poor detector of unfamiliar "
            "data. Measured here: " + "; ".join(lines) + ".",
            (ood, "per-image test bits/dim, trained-on dataset against the other one"),
        ]))
    return sections


def _ood_summary(run: RunSummary) -> str:
    ood = run.ood
    median_in = statistics.median(ood["in"])
    better = sum(v < median_in for v in ood["out"]) / len(ood["out"])
    return (f"{run.name} (trained on {ood['dataset']}): mean {statistics.mean(ood['in']):.3f} bits/dim on "
            f"{ood['dataset']} test, {statistics.mean(ood['out']):.3f} on {ood['ood_dataset']} test; "
            f"{better:.1%} of {ood['ood_dataset']} images score better than the median {ood['dataset']} image")


def _write(report: Report, meta: dict) -> tuple[Path, Path]:
    title = "couplings: flow comparison report"
    stamp = f"Generated {meta['date']} by `couplings compare` ({meta['version']}) from: " + ", ".join(
        str(r.path) for r in report.runs) + "."
    md, body = [f"# {title}", "", stamp, ""], [f"<h1>{html.escape(title)}</h1>", f'<p class="note">{html.escape(stamp)}</p>']
    for heading, parts in _sections(report, meta):
        md += [f"## {heading}", ""]
        body.append(f"<h2>{html.escape(heading)}</h2>")
        for part in parts:
            if isinstance(part, str):
                md += [part, ""]
                body.append(f"<p>{html.escape(part)}</p>")
            elif len(part) == 3:
                headers, rows, table_id = part
                md += [_md_table(headers, rows), ""]
                body.append(_html_table(headers, rows, table_id))
            else:
                path, caption = part
                md += [f"![{caption}]({path.name})", "", f"*{caption}*", ""]
                body.append(f'<figure><img src="{_data_uri(path)}" alt="{html.escape(caption)}">'
                            f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    md_path, html_path = report.directory / "report.md", report.directory / "report.html"
    md_path.write_text("\n".join(md))
    html_path.write_text(
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    return md_path, html_path


def compare(
    runs: list[str | Path],
    out: str | Path,
    *,
    samples: int = 10_000,
    draws: int = 3,
    ood_images: int | None = None,
    ood_dataset: str | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Report:
    """Evaluates ``runs`` and writes ``report.md``, ``report.html`` and the figures into ``out``.

    Args:
        samples: Samples per run for FID/KID/precision/recall (0 skips them).
        draws: Dequantization draws for the spread of test bits/dim (seeds 0..draws-1).
        ood_images: Test images per dataset for the out-of-distribution histogram (None: all).
        ood_dataset: The other dataset for that histogram (default: Fashion-MNIST for MNIST runs
            and the reverse).
    """
    from couplings import __version__

    if not runs:
        raise ValueError("compare needs at least one run directory")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, found {draws}")
    device = torch.device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = [
        summarize_run(Path(run), out, index, samples=samples, draws=draws, device=device, ood_dataset=ood_dataset,
                      ood_images=ood_images, progress=progress)
        for index, run in enumerate(runs)
    ]
    for stale in ("curves.png", "ood.png"):
        (out / stale).unlink(missing_ok=True)
    _plot_curves(summaries, out / "curves.png")
    _plot_ood(summaries, out / "ood.png")
    report = Report(summaries, HEADERS, table(summaries), out)
    meta = {"samples": samples, "draws": draws, "device": describe(device), "version": __version__,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    _write(report, meta)
    return report
