# `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench clean fashion-mnist

FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch; an open range would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP) fashion-mnist

test: $(STAMP) fashion-mnist
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/tokenformer presets

bench: $(STAMP)
	$(PY) benchmarks/pattention.py

# Fashion-MNIST for the vision model; Debian and Ubuntu package its IDX files. Not fatal: without
# apt (or root) the tests that need it are skipped, and training takes the files' directory.
fashion-mnist:
	@if [ -d $(FASHION_MNIST_DIR) ]; then echo "Fashion-MNIST: $(FASHION_MNIST_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
		($$SUDO apt-get install -y -q dataset-fashion-mnist || ($$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist)) \
			|| echo "Fashion-MNIST not installed (apt-get failed); the tests that need it will be skipped"; \
	else echo "no apt-get: put Fashion-MNIST's four IDX files in a directory and pass it to the loader"; fi

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
