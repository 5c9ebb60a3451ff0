# The two set-up commands of the README: `make train` and `make test`.
# Each creates .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv train test bench clean

venv: $(STAMP)

# torch==2.13.0 is pinned: this machine holds its CPU wheel on disk, any other
# pin downloads gigabytes. The code itself runs on torch >= 2.11.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/trident-train $(ARGS)

# Two workers: a third of a serial run is spent waiting (SLURM's scheduler, trial processes starting); a
# file's tests stay on one worker, the SLURM tier on one (tests/conftest.py). TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -rs -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/loop_overhead.py

clean:
	rm -rf $(VENV) outputs multirun
