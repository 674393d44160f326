#!/bin/bash
# The parts of `make demo` (DEMO_MINUTES=10), run one after another on one thread of the 2-core AMD EPYC
# while the other core trained another model, as make demo's two-at-a-time trainings do; then the report.
# 2026-12-06. The per-model evaluations at T = 1.0 (and, after the report, at T = 0.7) are in each run's eval.json.
set -ex
export OMP_NUM_THREADS=1
B=.venv/bin
$B/couplings train glow --set size=fast --set num_classes=10 --set class_prior=position --set class_couplings=true \
  --set val_size=2000 --max-minutes 10 --out runs/demo10/glow-cond-fast --quiet
$B/couplings train realnvp --set size=fast --set val_size=2000 --max-minutes 10 --out runs/demo10/realnvp-fast --quiet
$B/couplings train nice --set size=small --set val_size=2000 --max-minutes 10 --out runs/demo10/nice-small --quiet
for r in glow-cond-fast realnvp-fast nice-small; do
  $B/couplings eval runs/demo10/$r --samples 2000
done
$B/couplings train latent-realnvp --set ae_epochs=3 --epochs 8 --device cpu --quiet --out runs/demo10/latent-realnvp
$B/couplings compare runs/demo10/nice-small runs/demo10/latent-realnvp runs/demo10/realnvp-fast runs/demo10/glow-cond-fast \
  --out runs/demo10/report --samples 2000 --ood-images 2000 --device cpu
for r in glow-cond-fast realnvp-fast nice-small; do
  $B/couplings eval runs/demo10/$r --samples 2000 --temperature 0.7
done
