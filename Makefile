# The two commands: `make demo` (build, serve, score data/sample.csv, stop) and `make test` (everything).
# bash with pipefail: a failing command is not hidden by the filter it is piped into.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo build serve lint format test test-fast bench perf clean

# pip's own progress lines show what the ~2 minutes of a first install are spent on.
$(STAMP): pyproject.toml client/pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip==25.3
	@echo "== installing the project and its pinned dependencies into $(VENV) (about 2 minutes the first time)"
	$(BIN)/python -m pip install --progress-bar off -c constraints.txt -e ".[dev]" -e "./client[plot,spark]" \
	  | grep -E "^(Collecting|Successfully installed)" | cut -c1-100
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m mtl_serve.demo --config config.yaml --input data/sample.csv --out-dir outputs

build: $(STAMP)
	$(BIN)/mtl-build --config config.yaml --output model_repository

serve: $(STAMP)
	$(BIN)/mtl-serve --model-repository model_repository

# ruff: one linter and formatter, one line length (pyproject.toml); CI runs this before the tests.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not e2e and not reliability"

# A short benchmark (the product against the in-process peers) and a short perf_analyzer run, each against a
# freshly started local Triton; results in perf_results/ (docs/benchmarks.md has the full commands).
bench: build
	$(BIN)/python -m mtl_tools.bench --model-repository model_repository --sentences 256 --repeats 1 --out perf_results/bench

perf: build
	$(BIN)/python -m mtl_tools.perf run data/validation.csv --model-repository model_repository \
	  --requests 1:1,2 --requests 64:1 --stability 100 --out-dir perf_results/perf

# Generated files are exactly the git-ignored ones: model.py and the core package are tracked and stay.
clean:
	rm -rf outputs perf_results
	git clean -fdXq model_repository
