# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_MINUTES ?= 3
DEMO := runs/demo
PAPER := runs/paper

.PHONY: install demo paper test bench clean

# The constraints file pins torch 2.13.0 (a local CPU build here); the package itself asks for torch>=2.2.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Every model with a short CPU budget (DEMO_MINUTES each: NICE at its small size, Real NVP and
# Glow at their fast presets, chosen by learning-curve sweeps on one CPU thread; LatentRealNVP
# with 3 autoencoder and 8 flow epochs), then the comparison report in $(DEMO)/report/report.html.
demo: install
	$(BIN)/couplings data fetch mnist
	$(BIN)/couplings data fetch fashion-mnist
	rm -rf $(DEMO)
	$(BIN)/couplings train nice --set size=small --device cpu --max-minutes $(DEMO_MINUTES) \
	  --out $(DEMO)/nice-small --quiet
	for model in realnvp glow; do \
	  $(BIN)/couplings train $$model --set size=fast --device cpu --max-minutes $(DEMO_MINUTES) \
	    --out $(DEMO)/$$model-fast --quiet || exit 1; \
	done
	$(BIN)/couplings train latent-realnvp --set ae_epochs=3 --epochs 8 --device cpu --out $(DEMO)/latent-realnvp --quiet
	$(BIN)/couplings compare $(DEMO)/nice-small $(DEMO)/latent-realnvp $(DEMO)/realnvp-fast $(DEMO)/glow-fast \
	  --out $(DEMO)/report --samples 2000 --ood-images 2000 --device cpu
	@echo "demo done: open $(DEMO)/report/report.html (or read $(DEMO)/report/report.md)"

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

# Side by side with normflows on matched architectures (one JSON object), then our own throughput.
bench: install
	$(BIN)/python benchmarks/peer.py --threads 2 --steps 30
	$(BIN)/python benchmarks/peer.py --threads 2 --steps 30 --mode train --couplings-adam fused
	$(BIN)/python benchmarks/speed.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
