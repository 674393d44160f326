"""Scratch check, kept as it ran (from /tmp, before the fine-tunes): the long run's own classifier
p(c | x) on 500 test images, and on 500 of its samples at T = 1.0 (50 per digit) whether it names
the asked-for digit where the project's classifier reads another. Output: own-samples.txt.

    OMP_NUM_THREADS=2 python scripts/analysis/own_samples.py long.pt

The long run's weights were the pretrained glow-cond-mnist until 2026-12-07 (now its fine-tune):
`git show d2e2d30:src/couplings/pretrained/glow-cond-mnist.pt > long.pt`.
"""
import sys
import time

import torch

from couplings import checkpoint, data
from couplings.classifier import load_classifier
from couplings.metrics import as_float_images

torch.manual_seed(0)
model, _ = checkpoint.load_model(sys.argv[1]); model.eval()  # the long run's weights
clf = load_classifier("mnist")
x, y = data.load("mnist", "test")
x = torch.as_tensor(x[:500]).float().unsqueeze(1); y = torch.as_tensor(y[:500]).long()
K = 10
def class_logp(pixels):  # (B, K) log p(x | k) at one draw of dequantization
    with torch.inference_mode():
        noise = torch.rand_like(pixels)
        k = pixels
        u, _ = (noise, None) if model.dequantizer is None else model.dequantizer(noise, k)
        v = (k + u) / 256
        B = len(v)
        vr = v.repeat_interleave(K, 0); yr = torch.arange(K).repeat(B)
        return model.log_prob(vr, yr).view(B, K)
t = time.time()
lp = torch.cat([class_logp(x[i:i+50]) for i in range(0, 500, 50)])
print("bayes acc on test", (lp.argmax(1) == y).float().mean().item(), "CE nats", torch.nn.functional.cross_entropy(lp, y).item(), f"{time.time()-t:.0f}s")
ys = torch.arange(10).repeat_interleave(50)
g = torch.Generator().manual_seed(0)
with torch.inference_mode():
    s = torch.cat([model.sample(50, ys[i:i+50], generator=g) for i in range(0, 500, 50)])
    ext = clf(as_float_images(s)).argmax(1)
pix = (s.clamp(0, 1) * 255).round()  # approx 8-bit
lps = torch.cat([class_logp(pix[i:i+50]) for i in range(0, 500, 50)])
bay = lps.argmax(1)
print("samples: ext acc", (ext == ys).float().mean().item(), "model-bayes acc", (bay == ys).float().mean().item())
wrong = ext != ys
print("on ext-wrong samples: bayes says asked-for", (bay[wrong] == ys[wrong]).float().mean().item(), "bayes agrees with ext", (bay[wrong] == ext[wrong]).float().mean().item(), "n", wrong.sum().item())
print("CE of the asked label on samples", torch.nn.functional.cross_entropy(lps, ys).item())
