# One place for the commands a person and CI run. `make train` and `make test` set everything up
# in .venv first (torch is pinned by constraints.txt, so pip never picks a multi-GB CUDA build on
# a CPU machine that has the CPU wheel; on a GPU machine the same pin is PyPI's CUDA build).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup train test test-slow docs bench chaos suite device-check lint clean

$(BIN)/impala: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[test,docs]'
	touch $@

setup: $(BIN)/impala

train: setup
	$(BIN)/impala train $(ARGS)

test: setup
	$(BIN)/python -m pytest $(ARGS)

test-slow: setup
	$(BIN)/python -m pytest -m slow $(ARGS)

# The documentation site (docs/, mkdocs.yml) into site/, warnings as errors; CI builds it too.
# NO_MKDOCS_2_WARNING: Material's notice about MkDocs' future, printed on every build.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site $(ARGS)

bench: setup
	$(BIN)/impala bench --env CartPole-v1 $(ARGS)

chaos: setup
	$(BIN)/python benchmarks/chaos.py $(ARGS)

suite: setup
	$(BIN)/python benchmarks/suite.py --stop-at-budget $(ARGS)

# The GPU learner on a 1-GPU machine (docs/guides/gpu.md): the CUDA tests, a Pong bench and a
# Pong run to 18, one table; exit 2 where there is no CUDA device.
device-check: setup
	$(BIN)/python benchmarks/device_check.py $(ARGS)

lint: setup
	$(BIN)/pip install -q ruff
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) runs site .pytest_cache
