"""Trains the feature classifier used by couplings.metrics and writes its weights.

    python scripts/train_classifier.py --dataset mnist          # -> src/couplings/weights/classifier-mnist.pt
    python scripts/train_classifier.py --dataset fashion-mnist --epochs 12 --shift 1 --flip

Adam with a cosine schedule, random shifts (and, for Fashion-MNIST, horizontal flips), seeded
and deterministic on CPU. The weights file records the command, the test accuracy and
the torch version; it is committed so that no weights are ever downloaded at run time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from couplings import data
from couplings.classifier import Classifier
from couplings.hardware import describe


def _as_input(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.unsqueeze(1).float() / 255  # (N, 28, 28) uint8 -> (N, 1, 28, 28) in [0, 1]


def _shifted(pixels: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Each image moved by its own random offset of up to ``max_shift`` pixels (zero fill)."""
    n, h, w = pixels.shape
    padded = torch.nn.functional.pad(pixels, (max_shift,) * 4)  # (N, H, W) -> (N, H + 2s, W + 2s)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n, 1, 1), generator=generator)
    rows = torch.arange(h).view(1, h, 1) + dy  # (N, H, 1)
    cols = torch.arange(w).view(1, 1, w) + dx  # (N, 1, W)
    return padded[torch.arange(n).view(n, 1, 1), rows, cols]


@torch.no_grad()
def accuracy(model: Classifier, images, labels, batch_size: int = 1000) -> float:
    model.eval()
    pixels, labels = torch.as_tensor(images), torch.as_tensor(labels).long()
    correct = sum(
        int((model(_as_input(pixels[i : i + batch_size])).argmax(1) == labels[i : i + batch_size]).sum())
        for i in range(0, len(pixels), batch_size)
    )
    return correct / len(pixels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist", choices=sorted(data.DATASETS))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--shift", type=int, default=2, help="random shifts of up to this many pixels")
    parser.add_argument("--flip", action="store_true", help="random horizontal flips (for Fashion-MNIST)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or Path(__file__).resolve().parents[1] / "src" / "couplings" / "weights" / f"classifier-{args.dataset}.pt"

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    images, labels = data.load(args.dataset, "train")
    test_images, test_labels = data.load(args.dataset, "test")
    pixels, targets = torch.as_tensor(images), torch.as_tensor(labels).long()
    model = Classifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs * (len(pixels) // 128))
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(pixels), generator=generator)
        for i in range(0, len(pixels) - 127, 128):
            idx = order[i : i + 128]
            batch = _shifted(pixels[idx], generator, args.shift) if args.shift else pixels[idx]
            if args.flip:
                flip = torch.rand(len(batch), generator=generator) < 0.5
                batch = torch.where(flip.view(-1, 1, 1), batch.flip(-1), batch)
            loss = F.cross_entropy(model(_as_input(batch)), targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch}: test accuracy {accuracy(model, test_images, test_labels):.4f}", flush=True)
    test_accuracy = accuracy(model, test_images, test_labels)
    seconds = time.perf_counter() - started
    torch.save(
        {
            "model_state": {k: v.clone() for k, v in model.state_dict().items()},
            "dataset": args.dataset,
            "test_accuracy": test_accuracy,
            "command": " ".join(["python", *sys.argv]),
            "seed": args.seed,
            "epochs": args.epochs,
            "seconds": seconds,
            "hardware": describe(torch.device("cpu")),
        },
        out,
    )
    print(f"{args.dataset}: test accuracy {test_accuracy:.4f} after {args.epochs} epochs, {seconds:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
