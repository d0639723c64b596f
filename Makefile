# bertscale: `make demo` runs the whole pipeline, `make test` runs the test suite.
# Both create .venv and install what they need. GPU users: install your CUDA torch first and run
#   make VENV_FLAGS=--system-site-packages demo
# so the virtual environment sees it (we only install torch when none is importable).

PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)

# torch first (a pinned CPU build unless one is already importable), so that deepspeed's build
# and our torch>=2.1 requirement find it and pip never pulls a CUDA build of its own.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Extra demo options: make demo ARGS="--set train.log_interval=5 --steps1 200"
ARGS ?=

demo: $(STAMP)
	$(BIN)/bertscale demo --out demo_out $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" tests

clean:
	rm -rf $(VENV) demo_out .pytest_cache
