"""The serving engine: continuous batching over the unified KV arena.

One `step()`:
  1. applies cancellations and admits waiting requests while the batch and the arena have room (FIFO);
  2. prefills one chunk of one admitted prompt (so a long prompt never stalls running decodes for long);
  3. runs one decode window for the running requests of one attention kind: up to `decode_window` tokens on
     device, then a single host read of the window's tokens.
Pages are taken before a window (enough for the whole window) and given back when a request finishes, is
cancelled or fails. When the arena cannot grow a running request, the most recently admitted one is preempted:
its pages are freed and its prompt plus output so far is prefilled again later.

Thread model: `submit` and `cancel` may be called from any thread; `step` from one thread only (the caller's,
or the background thread of `start`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from psa_jax.models import parallel
from psa_jax.models.llama import Decoder
from psa_jax.pallas_kernels.storage import storage_dtype
from psa_jax.models.tokenizer import Tokenizer
from psa_jax.backend import AttentionBackend
from psa_jax.config import DenseConfig, PSAConfig, TopKConfig
from psa_jax.serving import steps
from psa_jax.serving.arena import ArenaFull, KVArena
from psa_jax.serving.config import EngineConfig, SamplingParams

log = logging.getLogger(__name__)

WAITING, PREFILLING, RUNNING, HELD, FINISHED = "waiting", "prefilling", "running", "held", "finished"


MIN_TABLE_WIDTH = 8  # blocks; coarse buckets keep the number of compiled shapes small


def _resolve_mesh(spec: str, config) -> Mesh | None:
  """The engine's mesh from EngineConfig.mesh; None (plain single-device code) when it has one device."""
  if spec == "none":
    return None
  devices = jax.devices()
  mesh_config = (parallel.MeshConfig.default(len(devices), config) if spec == "auto"
                 else parallel.MeshConfig.parse(spec))
  mesh_config.check(config, len(devices))
  return None if mesh_config.size == 1 else parallel.make_mesh(mesh_config, devices)


def _bucket(n: int, minimum: int = 1) -> int:
  return max(minimum, 1 << max(0, n - 1).bit_length())


@dataclasses.dataclass(eq=False)
class Request:
  id: int
  prompt: list[int]
  params: SamplingParams
  attention: str
  tau: float
  stop_ids: tuple[int, ...]
  listener: Callable[["Request", list[int], bool], None] | None = None
  output: list[int] = dataclasses.field(default_factory=list)
  state: str = WAITING
  finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
  error: str | None = None
  prefilled: int = 0  # tokens of prompt + output already in the arena during a prefill
  preemptions: int = 0
  arrival: float = dataclasses.field(default_factory=time.monotonic)
  first_token_at: float | None = None
  finished_at: float | None = None
  done: threading.Event = dataclasses.field(default_factory=threading.Event)

  @property
  def context(self) -> list[int]:
    """What has to be in the arena before the next token is sampled."""
    return self.prompt + self.output


class Engine:
  def __init__(self, model: Decoder, tokenizer: Tokenizer | None, config: EngineConfig = EngineConfig(), *,
               num_pages: int | None = None):
    self.model = model
    self.tokenizer = tokenizer
    self.config = config
    c = model.config
    if config.max_context > c.max_context:
      raise ValueError(f"max_context {config.max_context} exceeds the model's {c.max_context}")
    self.mesh = _resolve_mesh(config.mesh, c)
    if config.layer_weights == "split" and self.mesh is not None:
      raise ValueError("layer_weights='split' runs on one device only; use 'stacked' or 'auto' with a mesh")
    if self.mesh is not None:  # places the caller's model on the mesh in place (no second copy of the weights)
      parallel.shard_model(model, self.mesh)
    self.kv_storage = storage_dtype(config.kv_dtype, model_dtype=model.dtype)
    if num_pages is None:
      self.arena = KVArena.from_budget(c, config.kv_memory, block_size=config.block_size, dtype=self.kv_storage,
                                       mesh=self.mesh)
    else:
      self.arena = KVArena(c, num_pages=num_pages, block_size=config.block_size, dtype=self.kv_storage,
                           mesh=self.mesh)
    self._graphdef, self._state = nnx.split(model)
    split = config.layer_weights == "split" or (
        config.layer_weights == "auto" and self.mesh is None and jax.default_backend() == "cpu")
    self._layers = model.split_layers() if split else None  # see psa_jax/models/llama.py
    self._backends = {
        "dense": AttentionBackend("dense", DenseConfig(), config.impl),
        "topk": AttentionBackend("topk", TopKConfig(k_blocks=config.topk_blocks), config.impl, config.dense_layers),
        "psa": AttentionBackend("psa", PSAConfig(tau=config.psa_tau), config.impl, config.dense_layers),
    }
    self._ids = itertools.count()
    self._lock = threading.Lock()
    self._wake = threading.Condition(self._lock)
    self._incoming: list[Request] = []
    self._cancelled: set[int] = set()
    self.waiting: list[Request] = []
    self.prefilling: list[Request] = []
    self.running: list[Request] = []
    self.held: list[Request] = []
    self._admitted_order: list[int] = []  # request ids, oldest first: preemption takes the newest
    self._kind_turn = 0
    self.telemetry: list[dict] = []  # one entry per decode window
    self.counters = {"requests": 0, "finished": 0, "cancelled": 0, "failed": 0, "preempted": 0,
                     "prompt_tokens": 0, "generated_tokens": 0, "windows": 0, "host_reads": 0}
    self._thread: threading.Thread | None = None
    self._stopping = False

  @property
  def splits_layers(self) -> bool:
    """Whether decode reads per-layer weight arrays (EngineConfig.layer_weights)."""
    return self._layers is not None

  # ------------------------------------------------------------------------------------------ requests

  def submit(self, prompt: list[int], params: SamplingParams = SamplingParams(), *, attention: str | None = None,
             tau: float | None = None, listener=None) -> Request:
    """Queues a request; raises ValueError for one that can never run (the engine is untouched)."""
    if not prompt:
      raise ValueError("prompt must hold at least one token")
    vocab = self.model.config.vocab_size
    if min(prompt) < 0 or max(prompt) >= vocab:
      raise ValueError(f"prompt token ids must lie in [0, {vocab})")
    if len(prompt) + params.max_tokens > self.config.max_context:
      raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                       f"of {self.config.max_context} tokens")
    attention = attention or self.config.attention
    if attention not in self._backends:
      raise ValueError(f"attention must be one of {tuple(self._backends)}, got {attention!r}")
    tau = self.config.psa_tau if tau is None else float(tau)
    if not 0.0 < tau <= 1.0:
      raise ValueError(f"tau must be in (0, 1], got {tau}")
    need = self.arena.pages_needed(-1, len(prompt) + params.max_tokens)
    if need > self.arena.num_pages:
      raise ValueError(f"request needs {need} KV pages, the arena holds {self.arena.num_pages}")
    stop = params.stop_token_ids
    if stop is None:
      stop = self.tokenizer.eos_token_ids if self.tokenizer else self.model.config.eos_token_ids
    request = Request(next(self._ids), list(prompt), params, attention, tau, tuple(stop), listener)
    with self._lock:
      self._incoming.append(request)
      self.counters["requests"] += 1
      self._wake.notify()
    return request

  def cancel(self, request_id: int) -> None:
    with self._lock:
      self._cancelled.add(request_id)
      self._wake.notify()

  def hold(self, request: Request) -> None:
    """Parks a running request: its KV stays in the arena, it stops decoding, and it can be forked. Cancel it
    to free its pages."""
    if request.state != RUNNING:
      raise ValueError("only a running request can be held")
    self.running.remove(request)
    self._admitted_order.remove(request.id)
    request.state = HELD
    self.held.append(request)

  def fork(self, request: Request, count: int, params: SamplingParams | None = None, *,
           attention: str | None = None, tau: float | None = None) -> list[Request]:
    """`count` new running requests that continue from `request`'s current state (parallel samples of one prompt
    without prefilling it again). They share the pages `request`'s context has filled and copy only the page
    still being filled (KVArena.share_sequence)."""
    if request.state not in (RUNNING, HELD):
      raise ValueError("only a running or held request can be forked")
    if attention is not None and attention not in self._backends:
      raise ValueError(f"attention must be one of {tuple(self._backends)}, got {attention!r}")
    forks = []
    for _ in range(count):
      child = dataclasses.replace(
          request, id=next(self._ids), params=params or request.params, listener=None, state=RUNNING,
          attention=attention or request.attention, tau=request.tau if tau is None else tau,
          output=list(request.output), done=threading.Event(), arrival=time.monotonic(),
          first_token_at=time.monotonic())
      # Every token but the last sampled one is in the arena: those blocks are never written again.
      self.arena.share_sequence(request.id, child.id, written=len(request.context) - 1)
      self.running.append(child)
      self._admitted_order.append(child.id)
      self.counters["requests"] += 1
      forks.append(child)
    return forks

  def has_work(self) -> bool:
    """True while anything is queued, prefilling, decoding or waiting to be cancelled (held requests are
    idle)."""
    with self._lock:
      return bool(self._incoming or self._cancelled or self.waiting or self.prefilling or self.running)

  def _finish(self, request: Request, reason: str, error: str | None = None) -> None:
    self.arena.release(request.id)
    for queue in (self.waiting, self.prefilling, self.running, self.held):
      if request in queue:
        queue.remove(request)
    if request.id in self._admitted_order:
      self._admitted_order.remove(request.id)
    request.state, request.finish_reason, request.error = FINISHED, reason, error
    request.finished_at = time.monotonic()
    key = {"cancelled": "cancelled", "error": "failed"}.get(reason, "finished")
    self.counters[key] += 1
    self._notify(request, [], True)
    request.done.set()

  def _notify(self, request, tokens, finished):
    if request.listener is not None:
      try:
        request.listener(request, tokens, finished)
      except Exception:  # a broken listener must not take the engine down
        log.exception("listener of request %d failed", request.id)

  def _emit(self, request: Request, tokens: list[int]) -> None:
    """Appends sampled tokens, stopping at a stop token or max_tokens; finishes the request if so."""
    kept = []
    reason = None
    for token in tokens:
      kept.append(token)
      if token in request.stop_ids:
        reason = "stop"
        break
      if len(request.output) + len(kept) >= request.params.max_tokens:
        reason = "length"
        break
    if kept and request.first_token_at is None:
      request.first_token_at = time.monotonic()
    request.output.extend(kept)
    self.counters["generated_tokens"] += len(kept)
    if kept:
      self._notify(request, kept, False)
    if reason:
      self._finish(request, reason)

  # -------------------------------------------------------------------------------------------- a step

  def step(self) -> None:
    """One round of admission, one prefill chunk, one decode window."""
    with self._lock:
      incoming, self._incoming = self._incoming, []
      cancelled, self._cancelled = self._cancelled, set()
    self.waiting.extend(incoming)
    for request in [r for q in (self.waiting, self.prefilling, self.running, self.held) for r in q
                    if r.id in cancelled]:
      self._finish(request, "cancelled")
    self._admit()
    if self.prefilling:
      self._guarded(self.prefilling[:1], self._prefill_chunk)
    if self.running:
      kinds = sorted({r.attention for r in self.running})
      kind = kinds[self._kind_turn % len(kinds)]
      self._kind_turn += 1
      self._guarded([r for r in self.running if r.attention == kind], lambda batch: self._decode_window(kind, batch))

  def _guarded(self, batch, fn):
    try:
      fn(batch)
    except Exception as e:  # fail the requests involved, keep serving the rest
      log.exception("engine step failed")
      for request in list(batch):
        if request.state != FINISHED:
          self._finish(request, "error", f"{type(e).__name__}: {e}")
      if any(x.is_deleted() for x in jax.tree.leaves(self.arena.kv)):
        self._reset_arena()

  def _reset_arena(self):
    """The donated arena was lost with a failed call: start from an empty one, recomputing everyone."""
    for request in list(self.held):
      self._finish(request, "error", "its KV cache was lost with a failed device call")
    for request in list(self.prefilling) + list(self.running):
      self._preempt(request)
    old = self.arena
    self.arena = KVArena(old.config, num_pages=old.num_pages, block_size=old.block_size, dtype=self.kv_storage,
                         mesh=self.mesh)

  def _admit(self) -> None:
    while self.waiting and len(self.prefilling) + len(self.running) < self.config.max_batch:
      request = self.waiting[0]
      try:
        self.arena.ensure(request.id, len(request.context) + 1)
      except ArenaFull:
        return  # FIFO: wait for pages rather than let later requests jump ahead
      self.waiting.pop(0)
      request.state, request.prefilled = PREFILLING, 0
      self.prefilling.append(request)
      self._admitted_order.append(request.id)
      self.counters["prompt_tokens"] += len(request.prompt) if request.preemptions == 0 else 0

  def _preempt(self, request: Request) -> None:
    self.arena.release(request.id)
    for queue in (self.prefilling, self.running):
      if request in queue:
        queue.remove(request)
    self._admitted_order.remove(request.id)
    request.state, request.prefilled = WAITING, 0
    request.preemptions += 1
    self.counters["preempted"] += 1
    self.waiting.insert(0, request)

  def _sampling(self, batch, size):
    pad = size - len(batch)
    col = lambda f, dtype: jnp.asarray(np.array([f(r) for r in batch] + [0] * pad, dtype))
    return steps.SamplingArrays(col(lambda r: r.params.seed, np.int32),
                                col(lambda r: r.params.temperature, np.float32),
                                col(lambda r: r.params.top_p, np.float32),
                                col(lambda r: r.params.top_k, np.int32))

  def _prefill_chunk(self, batch) -> None:
    request = batch[0]
    context = request.context
    chunk = context[request.prefilled : request.prefilled + self.config.prefill_chunk]
    span = _bucket(len(chunk), 16)
    tokens = np.zeros((1, span), np.int32)
    tokens[0, : len(chunk)] = chunk
    # Causal: this chunk sees only the blocks up to its end, so the table (and the attention) stop there.
    covered = -(-(request.prefilled + len(chunk)) // self.config.block_size)
    width = _bucket(covered, MIN_TABLE_WIDTH)
    self.arena.kv, token = steps.prefill_chunk(
        self._graphdef, self._state, self.arena.kv, jnp.asarray(self.arena.block_tables([request.id], width)),
        jnp.asarray(tokens), jnp.array([request.prefilled], jnp.int32), jnp.array([len(chunk)], jnp.int32),
        self._sampling([request], 1), mesh=self.mesh)
    request.prefilled += len(chunk)
    if request.prefilled == len(context):
      first = int(jax.device_get(token)[0])
      self.counters["host_reads"] += 1
      self.prefilling.remove(request)
      request.state = RUNNING
      self.running.append(request)
      self._emit(request, [first])

  def _decode_window(self, kind: str, batch: list[Request]) -> None:
    n_steps = self.config.decode_window
    batch = batch[: self.config.max_batch]
    for request in list(batch):  # pages for the whole window, preempting the newest requests if need be
      while request.state == RUNNING:
        remaining = request.params.max_tokens - len(request.output)
        try:
          self.arena.ensure(request.id, len(request.context) - 1 + min(n_steps, remaining))
          break
        except ArenaFull:
          newest = self._newest_running_id()
          self._preempt(next(r for r in self.running if r.id == newest))
    batch = [r for r in batch if r.state == RUNNING]
    if not batch:
      return
    # Batch buckets are powers of two and, on a mesh, at least its data axis so the rows split evenly.
    size = max(min(_bucket(len(batch)), _bucket(self.config.max_batch)), parallel.data_size(self.mesh))
    width = _bucket(max(self.arena.blocks(r.id) for r in batch), MIN_TABLE_WIDTH)
    pad = size - len(batch)
    ids = [r.id for r in batch] + [None] * pad
    window = steps.WindowState(
        jnp.asarray(np.array([r.output[-1] for r in batch] + [0] * pad, np.int32)),
        jnp.asarray(np.array([len(r.context) - 1 for r in batch] + [0] * pad, np.int32)),
        jnp.asarray(np.array([True] * len(batch) + [False] * pad)),
        jnp.asarray(np.array([r.params.max_tokens - len(r.output) for r in batch] + [0] * pad, np.int32)))
    width_stop = max(1, max(len(r.stop_ids) for r in batch))
    stop = np.full((size, width_stop), -1, np.int32)
    for row, r in enumerate(batch):
      stop[row, : len(r.stop_ids)] = r.stop_ids
    tau = jnp.asarray(np.array([r.tau for r in batch] + [1.0] * pad, np.float32))
    self.arena.kv, out, _, stats, n = steps.decode_window(
        self._graphdef, self._state, self.arena.kv, jnp.asarray(self.arena.block_tables(ids, width)), window,
        jnp.asarray(stop), self._sampling(batch, size), tau, self._layers, attention=self._backends[kind],
        num_steps=n_steps, mesh=self.mesh)
    out, stats, n = jax.device_get((out, stats, n))  # the window's one host read
    self.counters["host_reads"] += 1
    self.counters["windows"] += 1
    self._record(kind, len(batch), int(n), stats)
    for row, request in enumerate(batch):
      tokens = [int(t) for t in out[:n, row] if t >= 0]
      self._emit(request, tokens)

  def _newest_running_id(self) -> int:
    running = {r.id for r in self.running}
    return next(i for i in reversed(self._admitted_order) if i in running)

  def _record(self, kind, batch_size, n_steps, stats) -> None:
    samples = max(float(stats.samples), 1.0)
    mean = np.asarray(stats.blocks_sum) / samples
    spread = np.sqrt(np.maximum(np.asarray(stats.blocks_sq) / samples - mean**2, 0.0))
    self.telemetry.append({
        "attention": kind, "batch": batch_size, "steps": n_steps, "pages_used": self.arena.used_pages,
        "pages_free": self.arena.free_pages, "blocks_mean_per_layer": mean.tolist(),
        "blocks_std_per_layer": spread.tolist(),
        "blocks_share": float(np.asarray(stats.blocks_sum).sum() / max(float(stats.blocks_total) * len(mean), 1.0)),
    })
    del self.telemetry[:-1000]

  # ------------------------------------------------------------------------------------------- driving

  def run_until_idle(self, timeout: float | None = None) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    while self.has_work():
      if deadline is not None and time.monotonic() > deadline:
        raise TimeoutError("engine did not drain in time")
      self.step()

  def generate(self, prompts: list[list[int]], params: SamplingParams = SamplingParams(), **kwargs) -> list[list[int]]:
    """Submits every prompt, runs to completion, returns each output (the convenience batch API)."""
    requests = [self.submit(p, params, **kwargs) for p in prompts]
    self.run_until_idle()
    for r in requests:
      if r.finish_reason == "error":
        raise RuntimeError(f"request {r.id} failed: {r.error}")
    return [r.output for r in requests]

  def start(self) -> None:
    """Runs `step` on a background thread whenever there is work."""
    if self._thread is not None:
      return
    self._stopping = False

    def loop():
      while True:
        with self._lock:
          while not self._stopping and not (self._incoming or self._cancelled or self.waiting or self.prefilling
                                            or self.running):
            self._wake.wait()
          if self._stopping:
            return
        self.step()

    self._thread = threading.Thread(target=loop, name="psa-engine", daemon=True)
    self._thread.start()

  def stop(self, *, drain_timeout: float = 0.0) -> None:
    """Stops the background thread after letting in-flight requests finish for up to `drain_timeout` s; what
    is left is cancelled and its pages freed."""
    deadline = time.monotonic() + drain_timeout
    while self._thread is not None and self.has_work() and time.monotonic() < deadline:
      time.sleep(0.05)
    with self._lock:
      self._stopping = True
      self._wake.notify_all()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    with self._lock:
      self.waiting.extend(self._incoming)
      self._incoming = []
    for request in list(self.waiting) + list(self.prefilling) + list(self.running) + list(self.held):
      self._finish(request, "cancelled")

  def stats(self) -> dict:
    return {"pages_used": self.arena.used_pages, "pages_free": self.arena.free_pages,
            "pages_total": self.arena.num_pages, "running": len(self.running) + len(self.prefilling),
            "waiting": len(self.waiting) + len(self._incoming), **self.counters}
