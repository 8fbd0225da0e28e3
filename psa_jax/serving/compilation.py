"""Compiling ahead of requests: JAX's persistent compilation cache, a count of the compilations a process
really ran, the GPU kernel check and the engine's warm-up.

XLA compiles each new shape of the engine's device calls once per process; on a CPU that is seconds per shape.
The persistent cache stores the compiled code on disk, so a restarted server loads it instead of compiling,
and the warm-up compiles (or loads) the common shapes before the server reports ready.

On a GPU the decode attention runs Pallas kernels through the Triton compiler, which can crash the process
rather than raise. `check_kernels` compiles each attention's kernels in a worker process first
(psa_jax/pallas_kernels/gpu_compile.py) and moves any attention whose kernel does not compile to the XLA path,
so a server starts slower on that attention instead of dying on its first request.
"""

from __future__ import annotations

import dataclasses
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


KERNEL_CHECKS = ("auto", "always", "never")


@dataclasses.dataclass(frozen=True)
class KernelCheck:
  """when: "auto" (when the engine runs Pallas kernels compiled, i.e. on a GPU), "always" (also when they are
  interpreted: checks the GPU build of the same kernels from a CPU) or "never". compiler_dir: the Triton
  compiler's wheels for a machine whose jax has none (gpu_compile.CheckConfig; None: the running jax's own)."""

  when: str = "auto"
  compiler_dir: str | None = None

  def __post_init__(self):
    if self.when not in KERNEL_CHECKS:
      raise ValueError(f"kernel check must be one of {KERNEL_CHECKS}, got {self.when!r}")


def _device_arch() -> str:
  """The GPU's architecture as gpu_compile names it (sm_90 where there is no GPU)."""
  from psa_jax.pallas_kernels import gpu_compile

  device = jax.devices()[0]
  capability = getattr(device, "compute_capability", None) if device.platform == "gpu" else None
  return gpu_compile.arch_for(capability or "9.0").name


def fall_back(engine, failed: dict[str, str]) -> dict[str, str]:
  """Moves the attentions of `failed` (kind -> why its kernel did not compile) to the XLA path, and any attention
  whose dense layers need a dense kernel that failed. Returns kind -> reason of the attentions moved."""
  moved = {}
  backends = engine.runner.backends
  for kind, backend in backends.items():
    reason = failed.get(kind) or (failed.get("dense") and backend.dense_layers > 0 and
                                  f"its dense layers' kernel: {failed['dense']}")
    if reason and backend.impl != "xla":
      backends[kind] = dataclasses.replace(backend, impl="xla")
      moved[kind] = reason
  return moved


def check_kernels(engine, check: KernelCheck = KernelCheck(), *, log=None) -> dict[str, str]:
  """Compiles the Pallas kernels of every attention the engine serves for this machine's GPU, at the model's
  head shapes, block size and KV dtype, each in a worker process; an attention whose kernel fails moves to the
  XLA path (`fall_back`). `log` (default: stderr) gets a line per attention moved. Call it before the warm-up
  and before `start`. Returns kind -> reason of the attentions moved ({} when nothing was checked)."""
  from psa_jax.attention import resolve_impl
  from psa_jax.pallas_kernels import gpu_compile
  from psa_jax.pallas_kernels.storage import is_packed

  log = log or (lambda line: print(line, file=sys.stderr, flush=True))
  if check.when == "never" or (check.when == "auto" and jax.default_backend() != "gpu"):
    return {}
  backends = {k: b for k, b in engine.runner.backends.items() if resolve_impl(b.impl) == "pallas"}
  if not backends:
    return {}
  c = engine.model.config
  arena = engine.arena
  dtype = "packed" if is_packed(arena.dtype) else jax.numpy.dtype(arena.dtype).name
  shape = gpu_compile.KernelShape("model", q_heads=c.num_heads, kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                                  block_size=arena.block_size, batch=engine.config.scheduler.max_batch)
  cases = [gpu_compile.Case(kind, b.config, dtype, shape) for kind, b in backends.items()]
  if any(b.dense_layers for b in backends.values()) and "dense" not in backends:
    cases.append(gpu_compile.Case("dense", gpu_compile.DenseConfig(), dtype, shape))
  arch = _device_arch()
  began = time.perf_counter()
  try:
    rows = gpu_compile.check(cases, gpu_compile.CheckConfig(archs=(arch,), compiler_dir=check.compiler_dir))
  except RuntimeError as e:  # the worker could not start: nothing is known to compile
    rows, failed = [], {case.kind: str(e) for case in cases}
  else:
    failed = {case.kind: status for case, status in zip(cases, gpu_compile.case_status(cases, rows)) if status}
  moved = fall_back(engine, failed)
  for kind, reason in moved.items():
    log(f"psa_jax: the {kind} attention's Pallas kernel did not compile for {arch} ({reason}); "
        f"{kind} attention runs on the XLA path")
  log(f"psa_jax: GPU kernel check for {arch}: {len(rows) - len(gpu_compile.failures(rows))}/{len(rows)} kernels "
      f"compiled in {time.perf_counter() - began:.1f} s")
  return moved


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
