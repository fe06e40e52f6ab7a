# Two entry points for a fresh machine; each does its own set-up (virtual environment, install, model weights).
#   make test : notebooks in smoke mode + the book build, then pytest
#   make book : every notebook in full on the embedded model, then the HTML book in _build/html
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# e.g. PYTEST_ARGS="--record-durations tests/durations.json" refreshes the durations that order the run
PYTEST_ARGS ?=
# e.g. TORCH_PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu" where pip's default torch is a CUDA build
TORCH_PIP_ARGS ?=

.PHONY: test book setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# A CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0 $(TORCH_PIP_ARGS)
	$(PY) -m pip install --quiet -e ".[dev]"
	# The official LatentLens package, which a test runs beside the book's search: its index module needs only
	# torch, so it is installed without its dependencies (torchvision, hub clients) that this machine cannot use.
	$(PY) -m pip install --quiet --no-deps latentlens==0.1.0
	$(PY) -m vlminterp_utils.core.weights
	touch $(STAMP)

test: $(STAMP)
	$(PY) scripts/build_book.py --smoke
	$(PY) -m pytest -q -n 2 --dist worksteal --durations=15 $(PYTEST_ARGS) tests

book: $(STAMP)
	$(PY) scripts/build_book.py

clean:
	rm -rf _build
