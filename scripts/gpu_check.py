"""Compile every kernel for real, check it against the jnp oracle on long contexts, and time it.

On a GPU: `python scripts/gpu_check.py` (Pallas compiled through Triton, contexts 32K-128K).
Elsewhere, to check the script itself: `python scripts/gpu_check.py --contexts=256 --interpret`.
"""

import functools
import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp

from psa_jax import PSAConfig, TopKConfig, dense_attention, psa_attention, topk_attention
from psa_jax.synthetic import synthetic_decode_inputs

_CONTEXTS = flags.DEFINE_list("contexts", ["32768", "65536", "131072"], "Context lengths to check.")
_BATCH = flags.DEFINE_integer("batch", 2, "Sequences per call.")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Run Pallas in interpret mode (no GPU).")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per measurement.")


def timed(fn, *args):
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(_REPEATS.value):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times) * 1e3


def main(argv):
  del argv
  print(f"devices: {jax.devices()}  jax {jax.__version__}")
  calls = {
      "dense": lambda x, impl: (dense_attention(*x[:5], impl=impl, interpret=_INTERPRET.value), None),
      "topk": lambda x, impl: topk_attention(*x, TopKConfig(k_blocks=64), impl=impl, interpret=_INTERPRET.value),
      "psa": lambda x, impl: psa_attention(*x, PSAConfig(), impl=impl, interpret=_INTERPRET.value),
  }
  failures = 0
  print(f"{'context':>8} {'kind':>6} {'dtype':>8} {'max_err':>9} {'blocks':>8} {'pallas_ms':>10} "
        f"{'xla_ms':>8} {'ref_ms':>8}")
  for context in map(int, _CONTEXTS.value):
    for dtype in (jnp.bfloat16, jnp.float32):
      lengths = [context - 7 * i for i in range(_BATCH.value)]  # ragged, not block-aligned
      x = synthetic_decode_inputs(0, lengths, q_heads=9, kv_heads=3, head_dim=64, dtype=dtype)
      for kind, call in calls.items():
        fns = {impl: jax.jit(functools.partial(call, impl=impl)) for impl in ("pallas", "xla", "reference")}
        got, used = fns["pallas"](x)
        want, want_used = fns["reference"](x)
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
        tol = 2e-2 if dtype == jnp.bfloat16 else 1e-3
        same_blocks = used is None or bool(jnp.all(used == want_used))
        ok = err <= tol and same_blocks
        failures += not ok
        blocks = "all" if used is None else f"{float(jnp.mean(used)):.0f}"
        print(f"{context:>8} {kind:>6} {jnp.dtype(dtype).name:>8} {err:>9.2e} {blocks:>8} "
              f"{timed(fns['pallas'], x):>10.3f} {timed(fns['xla'], x):>8.3f} {timed(fns['reference'], x):>8.3f}"
              f"{'' if ok else '  MISMATCH'}", flush=True)
  if failures:
    raise SystemExit(f"{failures} kernel checks failed")
  print("all kernels match the reference")


if __name__ == "__main__":
  app.run(main)
