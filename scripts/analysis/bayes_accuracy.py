"""The model's own classifier p(c | x) (Bayes' rule over log p(x | c), one draw of dequantization)
on the first 1,000 test images, for class-conditional runs given on the command line.

    OMP_NUM_THREADS=1 python scripts/analysis/bayes_accuracy.py RUN... >> results/glow-cond-disc/bayes-accuracy.txt
"""
import sys
import time

import torch
import torch.nn.functional as F

from couplings import checkpoint, data

images, labels = data.load("mnist", "test")
pixels, labels = torch.as_tensor(images[:1000]).unsqueeze(1), torch.as_tensor(labels[:1000]).long()
noise = torch.rand(pixels.shape, generator=torch.Generator().manual_seed(0))
for run in sys.argv[1:]:
    started = time.perf_counter()
    model, _ = checkpoint.load_model(run)
    model.eval()
    with torch.inference_mode():
        table = torch.cat([model.class_log_likelihoods(model.dequantize(pixels[i:i + 50], noise[i:i + 50])[0])
                           for i in range(0, len(pixels), 50)])
    right = table.argmax(1) == labels
    print(f"{run}: p(c | x) accuracy {float(right.float().mean()):.3f}, cross-entropy "
          f"{float(F.cross_entropy(table, labels)):.4f} nats on 1,000 test images ({time.perf_counter() - started:.0f} s)")
