# FINESegmentation: set-up, demo, tests and benchmarks on a fresh Linux machine with Python 3.11.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench demo-model clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fine-seg configs --forward

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/bench_inference.py

# The bundled demo model, reproduced from nothing with fixed seeds (about 40 min on 2 CPU cores).
demo-model: $(STAMP)
	$(VENV)/bin/fine-seg phantom --out data/phantoms-train --cases 20 --seed 0 --in-plane 256 -q
	OMP_NUM_THREADS=1 $(VENV)/bin/fine-seg train --data data/phantoms-train --out runs/fine-tiny-phantom \
		--config fine-tiny --epochs 12 --iterations 100 --batch-size 2 --seed 0 --device cpu

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
