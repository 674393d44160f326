"""Per-image reconstruction error max |inverse(transform(x)) - x| on the MNIST test set.

The same computation as couplings.evaluation.reconstruction_error (dequantization seed 0,
batches of 1000), but keeping each image's maximum, so the worst images can be counted.

    OMP_NUM_THREADS=1 python scripts/analysis/per_image_reconstruction.py CHECKPOINT_OR_PRETRAINED_NAME...
"""
import sys

import torch

from couplings import data
from couplings.checkpoint import load_model, pretrained_path
from couplings.likelihood import dequantize


@torch.inference_mode()
def per_image_errors(model, images, batch_size=1000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.as_tensor(images).unsqueeze(1)
    model.eval()
    errors = []
    for start in range(0, len(pixels), batch_size):
        x = dequantize(pixels[start : start + batch_size], generator, torch.float32)
        z, _ = model.transform(x)
        errors.append((model.inverse(z)[0] - x).abs().flatten(1).max(1).values)
    return torch.cat(errors)


images, _ = data.load("mnist", "test")
for name in sys.argv[1:]:
    path = name if name.endswith(".pt") else pretrained_path(name)
    model, state = load_model(path)
    errors = per_image_errors(model, images)
    worst = torch.sort(errors, descending=True)
    top = ", ".join(f"{v:.2e} (image {i})" for v, i in zip(worst.values[:5].tolist(), worst.indices[:5].tolist()))
    print(f"{name}: epoch {state.epoch}, step {state.step}; max {errors.max():.2e}; "
          f"images above 1e-4: {int((errors > 1e-4).sum())} of {len(errors)}; "
          f"above 5e-5: {int((errors > 5e-5).sum())}; median {errors.median():.2e}; worst five: {top}")
