# Two 3-minute variants for make demo, each trained and scored on one thread of the 2-core AMD EPYC
# (the other core busy with a training run), 2026-12-06: bash results/demo-variants/run.sh
set -x  # the sample grids: glow-cond-fast-3min.png (couplings sample -n 8, one row per digit) and nice-small-ema-sweep.png
cd /work/main; source .venv/bin/activate
export OMP_NUM_THREADS=1
rm -rf runs/dv
couplings train glow --set size=fast --set num_classes=10 --set class_prior=position --set class_couplings=true --device cpu --max-minutes 3 --out runs/dv/glow-cond-fast --quiet
couplings eval runs/dv/glow-cond-fast --samples 2000 2>&1 | grep -v "eval:"
couplings train nice --set size=small --set ema_decay=0.999 --device cpu --max-minutes 3 --out runs/dv/nice-small-ema --quiet
couplings eval runs/dv/nice-small-ema --samples 2000 2>&1 | grep -v "eval:"
couplings sample runs/dv/glow-cond-fast --temperatures 0.5,0.7,0.85,1.0 -n 8 -o runs/dv/glow-cond-fast-sweep.png
couplings sample runs/dv/nice-small-ema --temperatures 0.5,0.7,0.85,1.0 -n 8 -o runs/dv/nice-small-ema-sweep.png
