"""Server processes for the tests: the runner (which the serving benchmark uses too) and the flags they share."""

import os

from psa_jax.bench.server_process import free_port, running_server

# No warm-up: each test pays only for the shapes it meets, and the run's shared compilation cache (conftest.py)
# answers what another process of the run compiled already.
QUICK = ("--nowarmup", f"--compilation_cache_dir={os.environ.get('PSA_JAX_TEST_XLA_CACHE', 'none')}")
SMOLLM_FLAGS = ("--kv_memory=64MiB", "--max_context=1024", "--max_batch=4", "--decode_window=8",
                "--prefill_chunk=256", *QUICK)
SMOLLM = "smollm2-135m-instruct"

__all__ = ["QUICK", "SMOLLM", "SMOLLM_FLAGS", "free_port", "running_server"]
