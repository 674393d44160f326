# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_MINUTES ?= 5
DEMO_RUN := runs/demo-nice

.PHONY: install demo test bench clean

# The constraints file pins torch 2.13.0 (a local CPU build here); the package itself asks for torch>=2.2.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Fetch MNIST, train a small NICE for DEMO_MINUTES on CPU, evaluate it on the test set, draw samples.
demo: install
	$(BIN)/couplings data fetch mnist
	rm -rf $(DEMO_RUN)
	$(BIN)/couplings train nice --set size=small --device cpu --max-minutes $(DEMO_MINUTES) --out $(DEMO_RUN)
	$(BIN)/couplings eval $(DEMO_RUN) --device cpu
	$(BIN)/couplings sample $(DEMO_RUN) -n 64 --temperature 1.0 --device cpu -o $(DEMO_RUN)/samples.png
	@echo "demo done: test bits/dim in $(DEMO_RUN)/eval.json, samples in $(DEMO_RUN)/samples.png"

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/speed.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
