"""Conditional accuracy of the long class-conditional Glow, per class and per temperature: 1,000
samples per digit, classified by the project's MNIST classifier.

    OMP_NUM_THREADS=1 python scripts/analysis/per_class.py long.pt > results/long-glow-cond-fast/per-class.txt

The long run's weights were the pretrained glow-cond-mnist until 2026-12-07 (now its fine-tune):
`git show d2e2d30:src/couplings/pretrained/glow-cond-mnist.pt > long.pt`.
"""
import sys

import torch

from couplings import checkpoint
from couplings.classifier import load_classifier
from couplings.metrics import as_float_images

model, _ = checkpoint.load_model(sys.argv[1])  # the long run's weights
classifier = load_classifier("mnist")
labels = torch.arange(10).repeat_interleave(1000)  # 1,000 of each digit
print("temperature  accuracy  per digit 0-9; most frequent wrong answer per digit")
for temperature in (1.0, 0.85, 0.7):
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        samples = torch.cat([model.sample(1000, labels[i:i + 1000], temperature=temperature, generator=generator)
                             for i in range(0, len(labels), 1000)])
        predicted = torch.cat([classifier(as_float_images(samples[i:i + 1000])).argmax(1) for i in range(0, len(samples), 1000)])
    right = predicted == labels
    per_digit = [float(right[labels == d].float().mean()) for d in range(10)]
    confused = [int(torch.mode(predicted[(labels == d) & ~right]).values) if (~right[labels == d]).any() else -1
                for d in range(10)]
    print(f"T = {temperature:<4}  {float(right.float().mean()):.3f}  {' '.join(f'{a:.2f}' for a in per_digit)};  "
          f"{' '.join(map(str, confused))}")
