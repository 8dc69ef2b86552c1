# Every target creates .venv and installs the project first, so on a fresh machine
# `make test` or `make serve` is the whole set-up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch. For a GPU: make TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124" ...
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install deps-system serve test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# System packages the tests need: Debian's prometheus (with promtool) for tests/test_deploy.py.
deps-system:
	command -v prometheus >/dev/null && command -v promtool >/dev/null || \
		(apt-get update && apt-get install -y --no-install-recommends prometheus)

serve: $(STAMP)
	$(BIN)/pcgpt serve

test: $(STAMP) deps-system
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV)
