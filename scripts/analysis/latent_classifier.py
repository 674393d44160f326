"""How well the class-loss fine-tune's top latent carries the label: the accuracy and
cross-entropy of its classifier (Polyak weights) on the first 2,000 MNIST test images, each
dequantized with one uniform draw of the dequantizer's base noise.

    OMP_NUM_THREADS=1 python scripts/analysis/latent_classifier.py runs/glow-cond-ft-classloss
"""

import sys

import torch

from couplings import data
from couplings.checkpoint import load_model

model, _ = load_model(sys.argv[1])
images, labels = data.load("mnist", "test")
pixels = torch.as_tensor(images[:2000]).reshape(-1, 1, 28, 28)
y = torch.as_tensor(labels[:2000]).long()
correct, cross_entropy = 0, 0.0
with torch.inference_mode():
    for i in range(0, len(y), 200):
        p, t = pixels[i : i + 200], y[i : i + 200]
        noise = torch.rand(p.shape, generator=torch.Generator().manual_seed(i))
        _, z = model.pixel_log_prob_and_latent(p, noise, t)
        top = z[:, -392:].reshape(len(z), 8, 7, 7)
        h, _ = model.final.transforms[-1].inverse(top, t)
        logits = model.classifier(h.mean(dim=(2, 3)))
        correct += (logits.argmax(1) == t).sum().item()
        cross_entropy += torch.nn.functional.cross_entropy(logits, t, reduction="sum").item()
print(f"{sys.argv[1]}: classifier of the top latent on 2,000 test images: accuracy {correct / len(y):.4f}, "
      f"cross-entropy {cross_entropy / len(y):.4f} nats")
