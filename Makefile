# `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TF := $(VENV)/bin/tokenformer
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo bench clean fashion-mnist

FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch; an open range would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,hf,eval]'
	touch $(STAMP)

setup: $(STAMP) fashion-mnist

# Test files run in TEST_WORKERS processes (pytest-xdist), each file's tests in one of them, so
# that a module's shared fixtures are built once.
TEST_WORKERS ?= 2

test: $(STAMP) fashion-mnist
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# ruff is pinned in the `test` extra; a venv set up before that gets it here.
lint: $(STAMP)
	$(PY) -m ruff --version >/dev/null 2>&1 || $(PY) -m pip install --quiet ruff==0.17.6
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Train a small TokenFormer on the embedded corpus, grow it (validation perplexity unchanged),
# train on with AdamW's state carried over, and sample from it. Outputs: runs/demo. Then the
# scaling experiment in miniature (configs/scaling/demo.yaml): runs/scaling-demo/report.md.
demo: $(STAMP)
	rm -rf runs/demo
	@echo "== 1/4 train cpu-0.3M for 150 steps"
	$(TF) train --config configs/demo.yaml --max_steps 150
	@echo "== 2/4 grow: qkv/proj tokens 64 -> 128, ffn tokens 256 -> 512"
	$(TF) grow --checkpoint runs/demo --out runs/demo/grown --qkv_tokens 128 --proj_tokens 128 --ffn_tokens 512
	@echo "== 3/4 train the grown model to step 300"
	$(TF) train --config configs/demo.yaml --resume runs/demo/grown
	@echo "== 4/4 sample"
	$(TF) generate --model runs/demo --prompt "And God said" --max_new_tokens 60 --seed 0
	@echo "== scaling plan in miniature: grown TokenFormer vs from scratch vs Transformer (report: runs/scaling-demo/report.md)"
	rm -rf runs/scaling-demo
	$(TF) scale configs/scaling/demo.yaml

bench: $(STAMP)
	$(PY) benchmarks/pattention.py

# Fashion-MNIST for the vision model; Debian and Ubuntu package its IDX files. Not fatal, and never
# sudo: apt-get runs only as root; otherwise (or without apt) the tests that need it are skipped,
# and training takes the files' directory.
fashion-mnist:
	@if [ -d $(FASHION_MNIST_DIR) ]; then echo "Fashion-MNIST: $(FASHION_MNIST_DIR)"; \
	elif [ "$$(id -u)" != 0 ]; then \
		echo "Fashion-MNIST not installed: as root, apt-get install dataset-fashion-mnist; the tests that need it will be skipped"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		(apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) \
			|| echo "Fashion-MNIST not installed (apt-get failed); the tests that need it will be skipped"; \
	else echo "no apt-get: put Fashion-MNIST's four IDX files in a directory and pass it to the loader"; fi

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
