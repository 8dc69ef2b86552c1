# Every target creates .venv and installs what it needs first, so on a fresh machine
# `make serve` or `make test` is the whole set-up.
#   make serve    serving only: PyTorch and the package (pip install -e .)
#   make test     + the [dev] extra (pytest, the OpenAI client, transformers, ...) and Debian's prometheus
#   make bench    + the [dev] extra
#   make install  everything `make test` and `make bench` need
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch. For a GPU: make TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124" ...
TORCH_SPEC ?= torch==2.13.0
SERVE_STAMP := $(VENV)/.installed-serve
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: install install-serve deps-system serve test bench bench-llamacpp clean

$(SERVE_STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e .
	touch $@

$(DEV_STAMP): $(SERVE_STAMP)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install-serve: $(SERVE_STAMP)

install: $(DEV_STAMP)

# System packages the tests need: Debian's prometheus (with promtool) for tests/test_deploy.py,
# Debian's chromium for tests/test_playground.py; Debian's nginx for tests/test_replicas.py and
# bench/replicas.py (the load balancer); a C++ compiler for torch.compile's CPU kernels
# (tests/test_compiled_step.py, `pcgpt serve --compile`).
deps-system:
	command -v g++ >/dev/null || (apt-get update && apt-get install -y --no-install-recommends g++)
	command -v prometheus >/dev/null && command -v promtool >/dev/null || \
		(apt-get update && apt-get install -y --no-install-recommends prometheus)
	command -v chromium >/dev/null || (apt-get update && apt-get install -y --no-install-recommends chromium)
	command -v nginx >/dev/null || (apt-get update && apt-get install -y --no-install-recommends nginx-light)

serve: $(SERVE_STAMP)
	@echo "The command line is $(BIN)/pcgpt ($(BIN)/pcgpt --help lists its commands)."
	$(BIN)/pcgpt serve

test: $(DEV_STAMP) deps-system
	$(BIN)/python -m pytest -q

bench: $(DEV_STAMP)
	$(BIN)/python -m bench.run_all

# pcgpt against llama.cpp (bench/llamacpp.py): builds llama.cpp from the llama-cpp-python sdist
# into .cache/llamacpp/ once (cmake and g++ from Debian if missing); `make test` does not need it.
bench-llamacpp: $(DEV_STAMP)
	command -v cmake >/dev/null && command -v g++ >/dev/null && command -v perf >/dev/null || \
		(apt-get update && apt-get install -y --no-install-recommends cmake g++ linux-perf)
	nice -n 10 $(BIN)/python -m bench.llamacpp
	nice -n 10 $(BIN)/python -m bench.llamacpp --types q4_0 --batches 1,4 --new-tokens 32 \
		--out bench/results/llamacpp_q4.json
	nice -n 10 $(BIN)/python -m bench.llamacpp --types f32,f16,q8_0 --batches 1 --compile \
		--out bench/results/llamacpp_compile.json
	nice -n 10 $(BIN)/python -m bench.llamacpp_profile

clean:
	rm -rf $(VENV)
