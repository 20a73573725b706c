# The two commands: `make demo` (build, serve, score data/sample.csv, stop) and `make test` (everything).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo build serve test test-fast bench perf clean

$(STAMP): pyproject.toml client/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip==25.3
	$(BIN)/python -m pip install -q -e ".[dev]" -e ./client
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m mtl_serve.demo --config config.yaml --input data/sample.csv --out-dir outputs

build: $(STAMP)
	$(BIN)/mtl-build --config config.yaml --output model_repository

serve: $(STAMP)
	$(BIN)/mtl-serve --model-repository model_repository

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not e2e and not reliability"

clean:
	rm -rf outputs perf_results model_repository/.*.staging
	find model_repository -mindepth 2 -maxdepth 3 ! -name model.py ! -name multitask_core.py -type f -delete
