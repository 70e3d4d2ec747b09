# make demo / make test work on a fresh machine: they create .venv, install vaelab, and fetch the data.
PYTHON ?= python3
VENV   ?= .venv
# On this project's machines torch==2.13.0 is a local CPU wheel; elsewhere pass your own, e.g.
#   make test TORCH='torch>=2.4'
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: setup data images browser demo test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

data:
	bash scripts/get-data.sh

images:
	bash scripts/get-images.sh

browser:
	bash scripts/get-browser.sh

demo: setup data
	$(BIN)/vaelab demo

# every tier but the GPU one (benchmarks/gpu.sh runs that on a CUDA machine); under CI=true a skip is a failure
test: setup data images browser
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src
	$(BIN)/python -m pytest -q -m "not gpu"

# the developer's inner loop: about a minute
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

bench: setup data
	$(BIN)/python benchmarks/train_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
