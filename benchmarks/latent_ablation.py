"""Controlled runs of LatentRealNVP: one autoencoder per (autoencoder options, seed), shared by
every flow variant trained on its embeddings, each variant scored like `couplings eval`.

    python benchmarks/latent_ablation.py --out runs/latent-ablation \\
        --variant "default" --variant "lr 1e-3: lr=1e-3" --variant "no decay: weight_decay=0"

A variant is ``NAME: key=value, key=value`` (any `--set` key of latent-realnvp: flow model
options and training options; autoencoder options go in ``--autoencoder``). The autoencoder run
stops at the end of its stage (``ae_epochs`` epochs); each variant starts from a copy of that
checkpoint with its own flow, so variants differ in their flow alone. Every variant writes one
JSON line to ``--out``/results.jsonl: its options, training seconds of the flow stage, the best
validation NLL, and FID, conditional accuracy, precision and recall of ``--samples`` samples at
T = 1.0 against the test set (the project classifier's features), plus the same metrics for the
autoencoder's reconstructions of the test set (the floor the flow cannot go below).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from couplings import checkpoint, metrics
from couplings.classifier import load_classifier
from couplings.config import apply_overrides, from_stored, split_overrides
from couplings.data import load_split
from couplings.evaluation import evaluate_checkpoint
from couplings.hardware import describe
from couplings.models import MODELS, build_model
from couplings.rundir import RunDir
from couplings.training import train

MODEL = "latent-realnvp"


def _parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, options = text.partition(":")
    return name.strip(), [o.strip() for o in options.split(",") if o.strip()]


def autoencoder_run(out: Path, options: list[str], seed: int, dataset: str) -> Path:
    """Trains (once) the autoencoder stage of a run; returns its directory."""
    tag = "-".join(o.replace("=", "") for o in options) or "default"
    run = out / f"autoencoder-{tag}-seed{seed}"
    if (run / "last.pt").is_file() and checkpoint.load(run / "last.pt").stage == "flow":
        return run
    entry = MODELS[MODEL]
    size, model_overrides, train_overrides = split_overrides(options, entry.config, entry.train_config, MODEL)
    cfg = apply_overrides(entry.train_config(), train_overrides)
    n_train = 60_000 - cfg.val_size if dataset in ("mnist", "fashion-mnist") else None
    steps = cfg.ae_epochs * math.ceil(n_train / cfg.batch_size)  # the end of the autoencoder stage
    if run.exists():  # an interrupted autoencoder stage: continue it
        train(MODEL, run, train_overrides={"max_steps": steps}, device="cpu", progress=False, resume=True)
    else:
        train(MODEL, run, train_overrides={**train_overrides, "seed": seed, "dataset": dataset, "max_steps": steps},
              model_overrides=model_overrides, size=size, device="cpu", progress=False)
    return run


def graft(ae_run: Path, run: Path, options: list[str], seed: int) -> None:
    """A run directory at the start of the flow stage: ``ae_run``'s autoencoder, a new flow."""
    state = checkpoint.load(ae_run / "last.pt")
    assert state.stage == "flow" and state.epoch == 0, "the autoencoder run has not finished its stage"
    entry = MODELS[MODEL]
    _, model_overrides, train_overrides = split_overrides(options, entry.config, entry.train_config, MODEL)
    model_config = asdict(apply_overrides(entry.config(**state.model_config), model_overrides))
    cfg = apply_overrides(from_stored(entry.train_config, state.train), {**train_overrides, "max_steps": None})
    torch.manual_seed(seed)
    model = build_model(MODEL, model_config)
    ae_state = {k.removeprefix("autoencoder."): v for k, v in state.model_state.items() if k.startswith("autoencoder.")}
    model.autoencoder.load_state_dict(ae_state)
    run_dir = RunDir(run)
    run_dir.create()
    grafted = replace(state, model_config=model_config, train=asdict(cfg), model_state=model.state_dict())
    run_dir.write_config(grafted.description())
    run_dir.save_checkpoint(grafted, best=False)


def reconstruction_quality(ae_run: Path, dataset: str, val_size: int) -> dict:
    """Sample-quality metrics of the autoencoder's reconstructions of the test set."""
    model, _ = checkpoint.load_model(ae_run)
    images, labels = load_split(dataset, "test", val_size)
    x = torch.as_tensor(images).unsqueeze(1).float() / 255
    with torch.inference_mode():
        recon = torch.cat([model.autoencoder.decode(model.autoencoder.encode(x[i : i + 1000])) for i in range(0, len(x), 1000)])
    train_images, _ = load_split(dataset, "train", val_size)
    return metrics.sample_quality(load_classifier(dataset), recon, images, train_images, dataset=dataset,
                                  sample_labels=torch.as_tensor(labels).long())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="latent_ablation.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variant", action="append", required=True, help="NAME: key=value, ...")
    p.add_argument("--autoencoder", default="", help="key=value, ... for the autoencoder stage")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ae_options = [o.strip() for o in args.autoencoder.split(",") if o.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in [int(s) for s in args.seeds.split(",")]:
        started = time.perf_counter()
        ae_run = autoencoder_run(args.out, ae_options, seed, args.dataset)
        ae_seconds = time.perf_counter() - started
        val_size = checkpoint.load(ae_run / "last.pt").train["val_size"]
        floor = reconstruction_quality(ae_run, args.dataset, val_size)
        for spec in args.variant:
            name, options = _parse_variant(spec)
            run = args.out / f"{name.replace(' ', '_')}-seed{seed}"
            if not (run / "last.pt").is_file():
                graft(ae_run, run, options, seed)
            started = time.perf_counter()
            train(MODEL, run, resume=True, device="cpu", progress=False)
            flow_seconds = time.perf_counter() - started
            result = evaluate_checkpoint(run, dataset=args.dataset, samples=args.samples, temperature=1.0, seed=seed)
            quality = result.sample_quality
            line = {"variant": name, "options": options, "autoencoder": ae_options, "seed": seed, "dataset": args.dataset,
                    "threads": args.threads, "hardware": describe(torch.device("cpu")),
                    "autoencoder_seconds": round(ae_seconds, 1), "flow_seconds": round(flow_seconds, 1),
                    "val_nll": min(r["val_nll"] for r in RunDir(run).read_metrics() if r.get("stage") == "flow"),
                    "test_latent_nll": result.latent_nll_nats,
                    **{k: quality[k] for k in ("fid", "conditional_accuracy", "precision", "recall", "num_samples")},
                    "reconstruction": {k: floor[k] for k in ("fid", "conditional_accuracy", "precision", "recall")}}
            with open(args.out / "results.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
            print(f"{name} (seed {seed}): FID {line['fid']:.1f}, accuracy {line['conditional_accuracy']:.3f}, "
                  f"precision {line['precision']:.2f}, recall {line['recall']:.2f}, val NLL {line['val_nll']:.2f}, "
                  f"flow {flow_seconds / 60:.1f} min; reconstructions FID {floor['fid']:.1f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
