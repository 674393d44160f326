# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_MINUTES ?= 5
DEMO := runs/demo
PAPER := runs/paper

.PHONY: install demo demo-nice demo-glow demo-realnvp demo-latent paper test bench clean

# The constraints file pins torch 2.13.0 (a local CPU build here); the package itself asks for torch>=2.2.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Every model with a short CPU budget, trained two at a time on one thread each: Real NVP and
# class-conditional Glow at their fast presets, then NICE at its small size, for DEMO_MINUTES each
# (2,000 validation images, so that validating a cut-short epoch is quick), beside LatentRealNVP
# (3 autoencoder and 8 flow epochs); then the comparison report in $(DEMO)/report/report.html, each
# short run beside the shipped long-trained model of its kind, all scored on the first 2,000 test
# images with 1,000 samples, two evaluations at a time; its time is measured in docs/results.md
# ("What make demo shows").
DEMO_TRAIN = OMP_NUM_THREADS=1 $(BIN)/couplings train
DEMO_BUDGET = --set val_size=2000 --max-minutes $(DEMO_MINUTES) --device cpu --quiet
DEMO_RUNS = $(DEMO)/nice-small $(DEMO)/latent-realnvp $(DEMO)/realnvp-fast $(DEMO)/glow-cond-fast
DEMO_SHIPPED = pretrained:nice-mnist pretrained:latent-realnvp-mnist pretrained:realnvp-fast-mnist pretrained:glow-cond-mnist

demo: install
	$(BIN)/couplings data fetch mnist
	$(BIN)/couplings data fetch fashion-mnist
	rm -rf $(DEMO)
	@echo "demo $$(date +%T): Real NVP and class-conditional Glow, $(DEMO_MINUTES) minutes each"
	$(MAKE) --no-print-directory -j2 demo-realnvp demo-glow
	@echo "demo $$(date +%T): NICE for $(DEMO_MINUTES) minutes, LatentRealNVP for 3 + 8 epochs"
	$(MAKE) --no-print-directory -j2 demo-nice demo-latent
	@echo "demo $$(date +%T): the report, each run beside the shipped model of its kind"
	$(BIN)/couplings compare $(DEMO_RUNS) $(DEMO_SHIPPED) --out $(DEMO)/report \
	  --test-images 2000 --samples 1000 --ood-images 1000 --draws 1 --jobs 2 --device cpu
	@echo "demo $$(date +%T): done; open $(DEMO)/report/report.html (or read $(DEMO)/report/report.md)"

demo-nice:
	$(DEMO_TRAIN) nice --set size=small $(DEMO_BUDGET) --out $(DEMO)/nice-small
demo-glow:
	$(DEMO_TRAIN) glow --set size=fast --set num_classes=10 --set class_prior=position --set class_couplings=true \
	  $(DEMO_BUDGET) --out $(DEMO)/glow-cond-fast
demo-realnvp:  # Polyak averages: smoother samples after a few hundred steps (docs/results.md)
	$(DEMO_TRAIN) realnvp --set size=fast --set ema_decay=0.99 $(DEMO_BUDGET) --out $(DEMO)/realnvp-fast
demo-latent:
	$(DEMO_TRAIN) latent-realnvp --set ae_epochs=3 --epochs 8 --device cpu --quiet --out $(DEMO)/latent-realnvp

# The full recipes (paper sizes, no time budget): meant for a GPU; on CPU this takes days.
paper: install
	$(BIN)/couplings data fetch mnist
	$(BIN)/couplings data fetch fashion-mnist
	$(BIN)/couplings train nice --out $(PAPER)/nice --quiet
	$(BIN)/couplings train latent-realnvp --out $(PAPER)/latent-realnvp --quiet
	$(BIN)/couplings train realnvp --out $(PAPER)/realnvp --quiet
	$(BIN)/couplings train glow --out $(PAPER)/glow --quiet
	$(BIN)/couplings compare $(PAPER)/nice $(PAPER)/latent-realnvp $(PAPER)/realnvp $(PAPER)/glow --out $(PAPER)/report

test: install
	$(BIN)/python -m pytest -q

# Side by side with normflows on matched architectures (one JSON object), then our own throughput,
# then the roofline of the fast presets' training step on one thread and two.
bench: install
	$(BIN)/python benchmarks/peer.py --threads 2 --steps 30
	$(BIN)/python benchmarks/peer.py --threads 2 --steps 30 --mode train --couplings-adam fused
	$(BIN)/python benchmarks/peer.py --threads 2 --steps 30 --mode train --size fast --couplings-adam fused --arch realnvp glow
	$(BIN)/python benchmarks/speed.py
	for model in realnvp glow; do for run in "1 fp32" "2 fp32" "1 bf16"; do set -- $$run; \
	  OMP_NUM_THREADS=$$1 $(BIN)/python benchmarks/roofline.py $$model --set size=fast --set precision=$$2 --threads $$1 --markdown; \
	done; done

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
