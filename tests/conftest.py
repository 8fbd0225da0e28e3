"""Suite-wide set-up: one persistent XLA compilation cache for every process of a test run, unoptimized
compilation, compiled code released between test modules, and the default model's server shared by the modules
that talk to it.

The two pytest workers and the server processes the tests start compile many identical programs (the same
engine shapes in both workers, the same model behind several servers). A cache shared for the run turns the
repeats into loads. It lives in a fresh directory per run, so no run depends on what an earlier one left.
"""

import os
import shutil
import sys
import tempfile

import pytest

CACHE_VARIABLE = "PSA_JAX_TEST_XLA_CACHE"


def pytest_configure(config):
  # The controller makes the directory; xdist workers and server subprocesses inherit the variable.
  if CACHE_VARIABLE not in os.environ:
    os.environ[CACHE_VARIABLE] = tempfile.mkdtemp(prefix="psa_jax_test_xla_")
    config._psa_jax_made_cache = True
  # Read by JAX when it is first imported, which happens after this hook.
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ[CACHE_VARIABLE])
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")  # skip the many trivial ones
  # The suite's time is mostly XLA:CPU compiling small programs whose run time is negligible: compile them without
  # LLVM's optimizations (the same semantics; about 40% less time). Subprocesses inherit it.
  flag = "--xla_backend_optimization_level=0"
  if flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


def pytest_unconfigure(config):
  if getattr(config, "_psa_jax_made_cache", False):
    shutil.rmtree(os.environ.pop(CACHE_VARIABLE), ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
  """Drops JAX's compiled executables after each test module. A worker otherwise keeps every executable of
  the run alive, and XLA:CPU maps each one into memory: late in a run, compiling then fails for want of map
  entries (vm.max_map_count) and the worker aborts."""
  yield
  if "jax" in sys.modules:
    import jax
    jax.clear_caches()


@pytest.fixture(scope="session")
def server():
  """The default model (SmolLM2-135M-Instruct) behind a real server process, one per test worker; its URL.
  Tests that need other flags start their own."""
  from tests.server_process import SMOLLM_FLAGS, running_server

  with running_server(*SMOLLM_FLAGS) as (url, _):
    yield url
