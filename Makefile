# One place for the commands a person and CI run. `make train` and `make test` set everything up
# in .venv first (torch is pinned by constraints.txt, so pip never picks a multi-GB CUDA build on
# a CPU machine that has the CPU wheel; on a GPU machine the same pin is PyPI's CUDA build).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup train test test-slow bench chaos suite lint clean

$(BIN)/impala: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

setup: $(BIN)/impala

train: setup
	$(BIN)/impala train $(ARGS)

test: setup
	$(BIN)/python -m pytest $(ARGS)

test-slow: setup
	$(BIN)/python -m pytest -m slow $(ARGS)

bench: setup
	$(BIN)/impala bench --env CartPole-v1 $(ARGS)

chaos: setup
	$(BIN)/python benchmarks/chaos.py $(ARGS)

suite: setup
	$(BIN)/python benchmarks/suite.py --stop-at-budget $(ARGS)

lint: setup
	$(BIN)/pip install -q ruff
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
