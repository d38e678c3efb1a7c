# Two commands do everything on a fresh machine:
#   make repro   install, then run the DVC pipeline (dvc repro) on the embedded default data and weights
#   make test    install, then lint and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: install data repro test test-fast lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)

# Real labelled images, offline: Debian ships Fashion-MNIST.
data: $(FASHION_MNIST)

$(FASHION_MNIST):
	$(SUDO) apt-get update
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y dataset-fashion-mnist

repro: install data
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

lint: install
	$(BIN)/ruff check featurestore pipelines tests benchmarks notebooks

test: install data lint
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install data
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install data
	$(BIN)/python benchmarks/extract.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
