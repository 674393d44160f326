"""Conditional accuracy at T = 1.0 on 2,000 samples (200 of each digit, seed 0), classified by the
project's MNIST classifier: the quick check used while the fine-tunes trained, on copies of their
``last.pt`` (Polyak weights) taken between checkpoints. `couplings eval` gives the 10,000-sample figure.

    OMP_NUM_THREADS=1 python scripts/analysis/sample_accuracy.py CHECKPOINT...
"""
import sys

import torch

from couplings import checkpoint
from couplings.classifier import load_classifier
from couplings.metrics import as_float_images

classifier = load_classifier("mnist")
labels = torch.arange(10).repeat_interleave(200)
for run in sys.argv[1:]:
    model, _ = checkpoint.load_model(run)
    model.eval()
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        samples = torch.cat([model.sample(500, labels[i:i + 500], generator=generator) for i in range(0, 2000, 500)])
        predicted = classifier(as_float_images(samples)).argmax(1)
    print(f"{run}: T = 1.0 accuracy {float((predicted == labels).float().mean()):.4f} on 2,000 samples")
