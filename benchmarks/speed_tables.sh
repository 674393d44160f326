#!/usr/bin/env bash
# The README's throughput and fast-path tables: benchmarks/speed.py, 2 threads, on a quiet machine
# (nothing else running). One JSON line per measurement into the file given (default
# results/speed-cpu.jsonl).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/speed-cpu.jsonl}
py=${PYTHON:-.venv/bin/python}
: > "$out"
run() { OMP_NUM_THREADS=2 "$py" benchmarks/speed.py --steps 20 "$@" >> "$out"; }
run                                                   # NICE paper size, batch 200, adam=auto
run --size small
for adam in default fused; do run --adam "$adam"; done
run --compile --adam fused
for options in "--adam default" "--adam fused" "--adam fused --channels-last" "--compile --adam fused"; do
  run --model realnvp --size small --batch-size 64 $options
done
run --model glow --size small --batch-size 64 --steps 5 --precision bf16
run --model glow --size small --batch-size 64 --steps 5
echo "$out"
