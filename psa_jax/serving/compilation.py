"""Compiling ahead of requests: JAX's persistent compilation cache, a count of the compilations a process
really ran, and the engine's warm-up.

XLA compiles each new shape of the engine's device calls once per process; on a CPU that is seconds per shape.
The persistent cache stores the compiled code on disk, so a restarted server loads it instead of compiling,
and the warm-up compiles (or loads) the common shapes before the server reports ready.
"""

from __future__ import annotations

import os
import pathlib
import sys
import threading
import time

import jax
from jax import monitoring

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # every compile request, cache hits included
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def default_cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "psa_jax", "xla")


def enable_persistent_cache(path: str) -> None:
  """Keeps every compiled executable under `path`, however small or quick to compile: the engine's small
  helper calls would otherwise be compiled again on every start."""
  pathlib.Path(path).mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


class _CompileCounter:
  """Compilations XLA ran in this process: compile requests less the ones the persistent cache answered."""

  def __init__(self):
    self._lock = threading.Lock()
    self.requests = 0
    self.cache_hits = 0
    self.seconds = 0.0
    monitoring.register_event_duration_secs_listener(self._on_duration)
    monitoring.register_event_listener(self._on_event)

  def _on_duration(self, name, seconds, **_):
    if name == _COMPILE_EVENT:
      with self._lock:
        self.requests += 1
        self.seconds += seconds

  def _on_event(self, name, **_):
    if name == _CACHE_HIT_EVENT:
      with self._lock:
        self.cache_hits += 1

  @property
  def compiles(self) -> int:
    return self.requests - self.cache_hits


_counter: _CompileCounter | None = None
_counter_lock = threading.Lock()


def compile_counter() -> _CompileCounter:
  """The process's counter, listening from its first call on (call it before the work to be counted)."""
  global _counter
  with _counter_lock:
    if _counter is None:
      _counter = _CompileCounter()
    return _counter


def warmup(engine, *, context: int | None = None, kinds: tuple[str, ...] | None = None, progress: bool = True) -> dict:
  """Compiles (or loads from the persistent cache) the engine's common shapes (`ModelRunner.warmup_shapes`)
  for `kinds` (default: the engine's attention) up to `context` tokens (default: its max_context). Draws a
  progress bar on stderr. Returns {"shapes", "seconds", "compiles"}."""
  config = engine.config
  context = min(context or config.cache.max_context, config.cache.max_context)
  counter = compile_counter()
  before = counter.compiles
  shapes = []
  for kind in kinds or (config.attention.kind,):
    for shape in engine.runner.warmup_shapes(kind, context, config.scheduler.max_batch,
                                             config.scheduler.max_num_batched_tokens,
                                             config.scheduler.prefill_chunk):
      if shape not in shapes:
        shapes.append(shape)
  began = time.perf_counter()
  for i, shape in enumerate(shapes):
    if progress:
      print(f"\rpsa_jax: warming up {i + 1}/{len(shapes)} shapes ({time.perf_counter() - began:.0f} s)",
            end="", file=sys.stderr, flush=True)
    engine.runner.compile_shape(shape)
  seconds = time.perf_counter() - began
  if progress:
    print(f"\rpsa_jax: warmed up {len(shapes)} shapes in {seconds:.1f} s "
          f"({counter.compiles - before} compiled, the rest from the cache)", file=sys.stderr, flush=True)
  return {"shapes": len(shapes), "seconds": seconds, "compiles": counter.compiles - before}
