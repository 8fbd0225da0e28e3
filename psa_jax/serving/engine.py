"""The serving engine: continuous batching over the unified KV arena.

The engine owns the request registry, the thread and the bookkeeping of results; the scheduler
(scheduler.py) decides what each step runs and the runner (runner.py) runs it on the device. One `step()`:
  1. takes in new requests and cancellations (from any thread);
  2. admits waiting requests and prefills chunks of as many prompts as the token budget allows, in one call;
  3. runs one decode window for the running requests of one attention kind: up to `decode_window` tokens on
     device, then a single host read of the window's tokens.
A request that fails takes only itself down; a failed call that lost the donated arena restarts the others
from their prompt and output so far.

Thread model: `submit` and `cancel` may be called from any thread; `step` from one thread only (the caller's,
or the background thread of `start`).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time

import jax
import numpy as np
from jax.sharding import Mesh

from psa_jax.config import check_tau
from psa_jax.models import parallel
from psa_jax.models.llama import Decoder
from psa_jax.models.tokenizer import Tokenizer
from psa_jax.pallas_kernels.storage import storage_dtype
from psa_jax.serving.arena import KVArena
from psa_jax.serving.pages import ArenaFull
from psa_jax.serving.config import EngineConfig
from psa_jax.serving.request import Request, SamplingParams, Status
from psa_jax.serving.runner import ModelRunner
from psa_jax.serving.scheduler import Scheduler

log = logging.getLogger(__name__)


def _resolve_mesh(spec: str, config) -> Mesh | None:
  """The engine's mesh from EngineConfig.mesh; None (plain single-device code) when it has one device."""
  if spec == "none":
    return None
  devices = jax.devices()
  mesh_config = (parallel.MeshConfig.default(len(devices), config) if spec == "auto"
                 else parallel.MeshConfig.parse(spec))
  mesh_config.check(config, len(devices))
  return None if mesh_config.size == 1 else parallel.make_mesh(mesh_config, devices)


class Engine:
  def __init__(self, model: Decoder, tokenizer: Tokenizer | None, config: EngineConfig = EngineConfig(), *,
               num_pages: int | None = None):
    self.model = model
    self.tokenizer = tokenizer
    self.config = config
    c = model.config
    cache, parallel_config = config.cache, config.parallel
    if cache.max_context > c.max_context:
      raise ValueError(f"max_context {cache.max_context} exceeds the model's {c.max_context}")
    self.mesh = _resolve_mesh(parallel_config.mesh, c)
    if parallel_config.layer_weights == "split" and self.mesh is not None:
      raise ValueError("layer_weights='split' runs on one device only; use 'stacked' or 'auto' with a mesh")
    if self.mesh is not None:  # places the caller's model on the mesh in place (no second copy of the weights)
      parallel.shard_model(model, self.mesh)
    self.kv_storage = storage_dtype(cache.kv_dtype, model_dtype=model.dtype)
    if num_pages is None:
      self.arena = KVArena.from_budget(c, cache.kv_memory, block_size=cache.block_size, dtype=self.kv_storage,
                                       mesh=self.mesh)
    else:
      self.arena = KVArena(c, num_pages=num_pages, block_size=cache.block_size, dtype=self.kv_storage,
                           mesh=self.mesh)
    split = parallel_config.layer_weights == "split" or (
        parallel_config.layer_weights == "auto" and self.mesh is None and jax.default_backend() == "cpu")
    self.runner = ModelRunner(model, self.arena, backends=ModelRunner.make_backends(config.attention),
                              window=config.scheduler.decode_window, split_layers=split, mesh=self.mesh)
    self.scheduler = Scheduler(config.scheduler, self.arena)
    self._ids = itertools.count()
    self._lock = threading.Lock()
    self._wake = threading.Condition(self._lock)
    self._incoming: list[Request] = []
    self._cancelled: set[int] = set()
    self._pending_siblings: dict[int, Request] = {}  # samples of a prompt whose first request is not prefilled yet
    self.telemetry: collections.deque[dict] = collections.deque(maxlen=1000)  # one entry per decode window
    self.last_window: dict[str, dict] = {}  # attention kind -> its latest telemetry entry
    self.counters = {"requests": 0, "finished": 0, "cancelled": 0, "failed": 0, "preempted": 0,
                     "prompt_tokens": 0, "generated_tokens": 0, "windows": 0, "prefills": 0}
    self._thread: threading.Thread | None = None
    self._stopping = False

  # The scheduler's queues, for callers that watch progress.
  waiting = property(lambda self: list(self.scheduler.waiting))
  prefilling = property(lambda self: self.scheduler.prefilling)
  running = property(lambda self: self.scheduler.running)
  held = property(lambda self: self.scheduler.held)

  @property
  def splits_layers(self) -> bool:
    """Whether decode reads per-layer weight arrays (EngineConfig.layer_weights)."""
    return self.runner._layers is not None

  @property
  def _layers(self):
    return self.runner._layers

  # ------------------------------------------------------------------------------------------ requests

  def submit(self, prompt: list[int], params: SamplingParams = SamplingParams(), *, attention: str | None = None,
             tau: float | None = None, listener=None) -> Request:
    """Queues a request; raises ValueError for one that can never run (the engine is untouched)."""
    return self.submit_n(prompt, params, 1, attention=attention, tau=tau, listeners=[listener])[0]

  def submit_n(self, prompt: list[int], params: SamplingParams, n: int, *, attention: str | None = None,
               tau: float | None = None, listeners=None) -> list[Request]:
    """`n` samples of one prompt (OpenAI's `n`), the i-th with seed `params.seed + i`. The prompt is prefilled
    once: when its first request's prefill ends, the others share its pages (all but the last prompt token's
    block, which each copies) and each prefills that last token itself to draw its own first token."""
    if not 1 <= n <= 128:
      raise ValueError(f"n must be in [1, 128], got {n}")
    if not prompt:
      raise ValueError("prompt must hold at least one token")
    vocab = self.model.config.vocab_size
    if min(prompt) < 0 or max(prompt) >= vocab:
      raise ValueError(f"prompt token ids must lie in [0, {vocab})")
    if len(prompt) + params.max_tokens > self.config.cache.max_context:
      raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                       f"of {self.config.cache.max_context} tokens")
    attention = attention or self.config.attention.kind
    if attention not in self.runner.backends:
      raise ValueError(f"attention must be one of {tuple(self.runner.backends)}, got {attention!r}")
    tau = self.config.attention.psa_tau if tau is None else check_tau(tau)
    need = self.arena.pages_needed(-1, len(prompt) + params.max_tokens)
    if need > self.arena.num_pages:
      raise ValueError(f"request needs {need} KV pages, the arena holds {self.arena.num_pages}")
    stop = params.stop_token_ids
    if stop is None:
      stop = self.tokenizer.eos_token_ids if self.tokenizer else self.model.config.eos_token_ids
    if params.ignore_eos:
      if params.grammar is not None:
        raise ValueError("ignore_eos cannot be combined with constrained output, which ends at end-of-sequence")
      stop = ()
    if params.grammar is not None and params.grammar.vocab != self.model.config.vocab_size:
      raise ValueError("the grammar was compiled for another vocabulary")
    listeners = listeners or [None] * n
    requests = [Request(next(self._ids), list(prompt), dataclasses.replace(params, seed=(params.seed + i) % 2**31),
                        attention, tau, tuple(stop), listeners[i]) for i in range(n)]
    requests[0].siblings = requests[1:]
    with self._lock:
      self._incoming.append(requests[0])
      self._pending_siblings.update((r.id, r) for r in requests[1:])
      self.counters["requests"] += n
      self._wake.notify()
    return requests

  def cancel(self, request_id: int) -> None:
    with self._lock:
      self._cancelled.add(request_id)
      self._wake.notify()

  def hold(self, request: Request) -> None:
    """Parks a running request: its KV stays in the arena, it stops decoding, and it can be forked. Cancel it
    to free its pages."""
    self.scheduler.hold(request)

  def fork(self, request: Request, count: int, params: SamplingParams | None = None, *,
           attention: str | None = None, tau: float | None = None) -> list[Request]:
    """`count` new running requests that continue from `request`'s current state (parallel samples of one prompt
    without prefilling it again). They share the pages `request`'s context has filled and copy only the page
    still being filled (KVArena.share_sequence)."""
    if request.state not in (Status.RUNNING, Status.HELD):
      raise ValueError("only a running or held request can be forked")
    if attention is not None and attention not in self.runner.backends:
      raise ValueError(f"attention must be one of {tuple(self.runner.backends)}, got {attention!r}")
    forks = []
    for _ in range(count):
      now = time.monotonic()
      child = dataclasses.replace(
          request, id=next(self._ids), params=params or request.params, listener=None,
          attention=attention or request.attention, tau=request.tau if tau is None else tau,
          output=list(request.output), logprobs=list(request.logprobs),
          prompt_logprobs=list(request.prompt_logprobs), done=threading.Event(), arrival=now, admitted_at=now,
          first_token_at=now)
      # Every token but the last sampled one is in the arena: those blocks are never written again.
      self.arena.share_sequence(request.id, child.id, written=len(request.context) - 1)
      self.scheduler.add_running(child)
      self.counters["requests"] += 1
      forks.append(child)
    return forks

  def has_work(self) -> bool:
    """True while anything is queued, prefilling, decoding or waiting to be cancelled (held requests are
    idle)."""
    with self._lock:
      return bool(self._incoming or self._cancelled or self._pending_siblings or self.scheduler.has_work())

  def _finish(self, request: Request, reason: str, error: str | None = None) -> None:
    self.scheduler.remove(request)
    with self._lock:
      self._pending_siblings.pop(request.id, None)
    for sibling in request.siblings:  # never started: they end with the request that was to start them
      if sibling.state != Status.FINISHED:
        self._finish(sibling, reason, error)
    request.siblings = []
    request.state, request.finish_reason, request.error = Status.FINISHED, reason, error
    request.finished_at = time.monotonic()
    self.counters[{"cancelled": "cancelled", "error": "failed"}.get(reason, "finished")] += 1
    self._notify(request, [], True)
    request.done.set()

  def _notify(self, request, tokens, finished):
    if request.listener is not None:
      try:
        request.listener(request, tokens, finished)
      except Exception:  # a broken listener must not take the engine down
        log.exception("listener of request %d failed", request.id)

  def _emit(self, request: Request, tokens: list[int], logprobs=None) -> None:
    """Appends sampled tokens (and their log-probabilities, when asked for), stopping at a stop token or
    max_tokens; finishes the request if so."""
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
    if logprobs is not None:
      request.logprobs.extend(logprobs[: len(kept)])
    self.counters["generated_tokens"] += len(kept)
    if kept:
      self._notify(request, kept, False)
    if reason:
      self._finish(request, reason)

  # -------------------------------------------------------------------------------------------- a step

  def step(self) -> None:
    """Admission, one batched prefill call, one decode window."""
    with self._lock:
      incoming, self._incoming = self._incoming, []
      cancelled, self._cancelled = self._cancelled, set()
    for request in incoming:
      self.scheduler.add(request)
    for request in [r for r in self.scheduler.requests() if r.id in cancelled]:
      self._finish(request, "cancelled")
    for request_id in cancelled & self._pending_siblings.keys():
      self._finish(self._pending_siblings[request_id], "cancelled")
    for request in self.scheduler.admit():
      if request.admitted_at is None:
        request.admitted_at = time.monotonic()
        self.counters["prompt_tokens"] += len(request.prompt)
    chunks = self.scheduler.plan_prefill()
    if chunks:
      self._guarded([ch.request for ch in chunks], lambda _: self._prefill(chunks))
    plan = self.scheduler.plan_decode()
    self.counters["preempted"] = self.scheduler.preemptions
    if plan is not None:
      self._guarded(plan.batch, lambda _: self._decode(plan))

  def _prefill(self, chunks) -> None:
    first = self.runner.prefill(chunks)
    self.counters["prefills"] += 1
    for ch, sampled in zip(chunks, first):
      ch.request.prefilled += ch.length
      if sampled is not None:
        token, logprob = sampled
        self.scheduler.start_running(ch.request)
        self._start_siblings(ch.request)
        self._emit(ch.request, [token], None if logprob is None else [logprob])

  def _start_siblings(self, request: Request) -> None:
    """The other samples of `request`'s prompt start from its pages: each is left one prompt token to prefill
    (its own first token is drawn there). Where the arena cannot hold a copy, a sample queues like any request."""
    siblings, request.siblings = request.siblings, []
    for sibling in siblings:
      with self._lock:
        if self._pending_siblings.pop(sibling.id, None) is None:
          continue  # cancelled meanwhile
      sibling.prompt_logprobs = list(request.prompt_logprobs)
      try:
        self.arena.share_sequence(request.id, sibling.id, written=len(request.prompt) - 1)
      except ArenaFull:
        self.scheduler.add(sibling)
        continue
      now = time.monotonic()
      sibling.arrival, sibling.admitted_at = request.arrival, now
      self.scheduler.add_prefilling(sibling, prefilled=len(request.prompt) - 1)

  def _decode(self, plan) -> None:
    result = self.runner.decode(plan.kind, plan.batch, plan.steps)
    # Window lengths follow measured time, which differs between hosts; the processes of a multi-host run must
    # make the same calls in the same order, so there every window runs its full length.
    if not result.compiled and jax.process_count() == 1:
      self.scheduler.observe_window(plan.kind, len(plan.batch), result.steps, result.seconds)
    self.counters["windows"] += 1
    self._record(plan.kind, len(plan.batch), result)
    for request, tokens, logprobs in zip(plan.batch, result.tokens, result.logprobs):
      self._emit(request, tokens, logprobs)

  def _guarded(self, batch, fn):
    try:
      fn(batch)
    except Exception as e:  # fail the requests involved, keep serving the rest
      log.exception("engine step failed")
      for request in list(batch):
        if request.state != Status.FINISHED:
          self._finish(request, "error", f"{type(e).__name__}: {e}")
      if self.runner.arena_lost():
        self._reset_arena()

  def _reset_arena(self):
    """The donated arena was lost with a failed call: start from an empty one, recomputing everyone."""
    for request in list(self.scheduler.held):
      self._finish(request, "error", "its KV cache was lost with a failed device call")
    for request in list(self.scheduler.prefilling) + list(self.scheduler.running):
      self.scheduler.preempt(request)
    self.arena.reset()

  def _record(self, kind, batch_size, result) -> None:
    stats = result.stats
    samples = max(float(stats.samples), 1.0)
    mean = np.asarray(stats.blocks_sum) / samples
    spread = np.sqrt(np.maximum(np.asarray(stats.blocks_sq) / samples - mean**2, 0.0))
    entry = {
        "attention": kind, "batch": batch_size, "steps": result.steps, "seconds": result.seconds,
        "pages_used": self.arena.used_pages, "pages_free": self.arena.free_pages,
        "blocks_mean_per_layer": mean.tolist(), "blocks_std_per_layer": spread.tolist(),
        "blocks_share": float(np.asarray(stats.blocks_sum).sum() / max(float(stats.blocks_total) * len(mean), 1.0)),
    }
    self.telemetry.append(entry)
    self.last_window[kind] = entry

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
          while not self._stopping and not (self._incoming or self._cancelled or self.scheduler.has_work()):
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
      incoming, self._incoming = self._incoming, []
    for request in incoming:
      self.scheduler.add(request)
    for request in self.scheduler.requests():
      self._finish(request, "cancelled")
    for request in list(self._pending_siblings.values()):
      self._finish(request, "cancelled")

  def stats(self) -> dict:
    return {"pages_used": self.arena.used_pages, "pages_free": self.arena.free_pages,
            "pages_total": self.arena.num_pages,
            "running": len(self.scheduler.running) + len(self.scheduler.prefilling),
            "waiting": len(self.scheduler.waiting) + len(self._incoming),
            "host_reads": self.runner.host_reads, **self.counters}

  def warmup(self, *, context: int | None = None, kinds: tuple[str, ...] | None = None,
             progress: bool = False) -> dict:
    """Compiles the common shapes ahead of requests (psa_jax/serving/compilation.py). Call it before `start`."""
    from psa_jax.serving.compilation import warmup
    return warmup(self, context=context, kinds=kinds, progress=progress)
