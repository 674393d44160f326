"""Writing the report as Markdown and as one self-contained HTML file."""

from __future__ import annotations

import base64
import html
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from couplings.files import atomic_write
from couplings.report.figures import TEMPERATURES
from couplings.report.table import (
    CONVERSION, COST, QUALITY, against_pretrained, columns, published_anchors, published_gaps,
)

if TYPE_CHECKING:
    from couplings.report.collect import Report, RunSummary

__all__ = ["write"]


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
    scored = (f"The first {meta['test_images']} test images" if meta.get("test_images") else "The test set")
    sections = [
        ("Results", [
            f"{scored} of each run's dataset. Sample metrics use {meta['samples']} samples at temperature 1.0 on "
            f"the features of the project's own classifier (not Inception; they compare only with each other). "
            f"Spread: standard deviation of test bits/dim over {meta['draws']} dequantization draws. Timings "
            f"(median of 5 after a warm-up) on {meta['device']}.",
            "What each model reaches:",
            (QUALITY, columns(report.rows, QUALITY), "quality"),
            "What it cost:",
            (COST, columns(report.rows, COST), "cost"),
            "How far each is from its published figure (lower bits/dim is better):",
            *[f"- {line}." for line in published_gaps(runs)],
        ]),
    ]
    long_runs = against_pretrained(runs)
    if long_runs:
        sections.append(("How far short runs are from long ones", [
            ("Each run trained here beside the shipped model of its kind, trained for much longer, scored on the "
             "same images with the same settings:"),
            *[f"- {line}." for line in long_runs],
        ]))
    sections += [
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


def write(report: Report, meta: dict) -> tuple[Path, Path]:
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
    atomic_write(md_path, "\n".join(md))
    atomic_write(
        html_path,
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    return md_path, html_path

