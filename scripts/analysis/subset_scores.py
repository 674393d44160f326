"""Exact scores of every shipped model on the first 1,000 MNIST test images (dequantization seed 0):
the mean log-likelihood in nats and those of the first and last image (latent NLL for
LatentRealNVP), to full float precision, so that two versions of the code can be compared digit
for digit.

    OMP_NUM_THREADS=1 python scripts/analysis/subset_scores.py
"""
import json

import torch
from couplings import checkpoint, data
from couplings.likelihood import bits_per_dim, log_probs
torch.set_num_threads(1)
images, labels = data.load("mnist", "test")
images, labels = images[:1000], labels[:1000]
out = {}
for name in ["nice-mnist", "nice-small-mnist", "realnvp-fast-mnist", "glow-cond-mnist", "latent-realnvp-mnist"]:
    model, _ = checkpoint.load_model(checkpoint.pretrained_path(name))
    if model.has_pixel_density:
        lp = log_probs(model, images, seed=0, labels=labels if model.conditional else None)
        out[name] = [float(lp.double().mean()), float(lp[0]), float(lp[-1])]
    else:
        x = torch.as_tensor(images).unsqueeze(1).float() / 255
        with torch.inference_mode():
            out[name] = [float(-model.log_prob(x, torch.as_tensor(labels).long()).double().mean())]
print(json.dumps(out))
