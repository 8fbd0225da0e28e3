"""The model runner: turns the scheduler's plans into the two compiled device calls of steps.py.

It owns what lives on the device (the weights, split per layer or not, and the KV arena) and the shape
buckets: batch rows, prefill spans and block-table widths are rounded up to powers of two, so a warm server
meets only shapes it has compiled (`warmup` compiles them ahead). Every call donates the arena and reads back
once: the first tokens of finished prompts after a prefill, the window's tokens after a decode window.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from psa_jax.backend import AttentionBackend
from psa_jax.config import DenseConfig, PSAConfig, TopKConfig
from psa_jax.models import parallel
from psa_jax.models.llama import Decoder
from psa_jax.serving import steps
from psa_jax.serving.arena import KVArena
from psa_jax.serving.request import Request
from psa_jax.serving.scheduler import MIN_SPAN, Chunk, bucket

MIN_TABLE_WIDTH = 8  # blocks; coarse buckets keep the number of compiled shapes small
MIN_STOP_COLUMNS = 4  # stop token ids per sequence: models have one to a few


@dataclasses.dataclass
class WindowResult:
  tokens: list[list[int]]  # per request of the batch, what it emitted (-1 padding removed)
  steps: int  # steps the window ran
  seconds: float  # wall time, device call and host read
  compiled: bool  # the call traced (compiled or loaded) a new shape; its time says little about the next
  stats: steps.WindowStats  # host numpy copies


class ModelRunner:
  def __init__(self, model: Decoder, arena: KVArena, *, backends: dict[str, AttentionBackend], window: int,
               split_layers: bool, mesh: Mesh | None):
    self.model = model
    self.arena = arena
    self.backends = backends
    self.window = window  # the decode window's capacity in steps (a shape; each window runs up to a limit)
    self.mesh = mesh
    self._graphdef, self._state = nnx.split(model)
    self._layers = model.split_layers() if split_layers else None  # see psa_jax/models/llama.py
    self.host_reads = 0

  @staticmethod
  def make_backends(config) -> dict[str, AttentionBackend]:
    """The three attention kinds a request may pick, with the engine's defaults (EngineConfig)."""
    return {
        "dense": AttentionBackend("dense", DenseConfig(), config.impl),
        "topk": AttentionBackend("topk", TopKConfig(k_blocks=config.topk_blocks), config.impl, config.dense_layers),
        "psa": AttentionBackend("psa", PSAConfig(tau=config.psa_tau), config.impl, config.dense_layers),
    }

  def _sampling(self, requests: list[Request], size: int) -> steps.SamplingArrays:
    pad = size - len(requests)
    col = lambda f, dtype: jnp.asarray(np.array([f(r) for r in requests] + [0] * pad, dtype))
    return steps.SamplingArrays(col(lambda r: r.params.seed, np.int32),
                                col(lambda r: r.params.temperature, np.float32),
                                col(lambda r: r.params.top_p, np.float32),
                                col(lambda r: r.params.top_k, np.int32))

  def prefill_shape(self, chunks: list[Chunk]) -> tuple[int, int, int]:
    """(rows, span, table width) of the call that prefills these chunks."""
    rows = bucket(len(chunks))
    span = bucket(max(ch.length for ch in chunks), MIN_SPAN)
    # Causal: a chunk sees only the blocks up to its end, so the table (and the attention) stop there.
    covered = max(-(-(ch.start + ch.length) // self.arena.block_size) for ch in chunks)
    return rows, span, bucket(covered, MIN_TABLE_WIDTH)

  def prefill(self, chunks: list[Chunk]) -> list[int | None]:
    """Writes the chunks' tokens into the arena in one call. Returns, per chunk, the sampled next token where
    the chunk ends its context, else None (one host read, only when some chunk is last)."""
    rows, span, width = self.prefill_shape(chunks)
    tokens = np.zeros((rows, span), np.int32)
    start = np.zeros(rows, np.int32)
    num = np.zeros(rows, np.int32)
    for row, ch in enumerate(chunks):
      tokens[row, : ch.length] = ch.request.context[ch.start : ch.start + ch.length]
      start[row], num[row] = ch.start, ch.length
    ids = [ch.request.id for ch in chunks] + [None] * (rows - len(chunks))
    requests = [ch.request for ch in chunks]
    self.arena.kv, sampled = steps.prefill_chunk(
        self._graphdef, self._state, self.arena.kv, jnp.asarray(self.arena.block_tables(ids, width)),
        jnp.asarray(tokens), jnp.asarray(start), jnp.asarray(num), self._sampling(requests, rows), mesh=self.mesh)
    if not any(ch.last for ch in chunks):
      return [None] * len(chunks)
    sampled = jax.device_get(sampled)
    self.host_reads += 1
    return [int(sampled[row]) if ch.last else None for row, ch in enumerate(chunks)]

  def decode_shape(self, batch_size: int, max_blocks: int) -> tuple[int, int]:
    """(rows, table width) of a decode window. Rows are powers of two and, on a mesh, at least its data axis
    so they split evenly."""
    return max(bucket(batch_size), parallel.data_size(self.mesh)), bucket(max_blocks, MIN_TABLE_WIDTH)

  def decode(self, kind: str, batch: list[Request], limit: int) -> WindowResult:
    """Up to `limit` decode steps for `batch` (pages for them already reserved) in one device call."""
    size, width = self.decode_shape(len(batch), max(self.arena.blocks(r.id) for r in batch))
    pad = size - len(batch)
    ids = [r.id for r in batch] + [None] * pad
    window = steps.WindowState(
        jnp.asarray(np.array([r.output[-1] for r in batch] + [0] * pad, np.int32)),
        jnp.asarray(np.array([len(r.context) - 1 for r in batch] + [0] * pad, np.int32)),
        jnp.asarray(np.array([True] * len(batch) + [False] * pad)),
        jnp.asarray(np.array([r.remaining_tokens for r in batch] + [0] * pad, np.int32)))
    stop = np.full((size, bucket(max(len(r.stop_ids) for r in batch), MIN_STOP_COLUMNS)), -1, np.int32)
    for row, r in enumerate(batch):
      stop[row, : len(r.stop_ids)] = r.stop_ids
    tau = jnp.asarray(np.array([r.tau for r in batch] + [1.0] * pad, np.float32))
    traces = steps.TRACES["decode_window"]
    began = time.perf_counter()
    self.arena.kv, out, _, stats, n = steps.decode_window(
        self._graphdef, self._state, self.arena.kv, jnp.asarray(self.arena.block_tables(ids, width)), window,
        jnp.asarray(stop), self._sampling(batch, size), tau, self._layers, jnp.int32(limit),
        attention=self.backends[kind], num_steps=self.window, mesh=self.mesh)
    out, stats, n = jax.device_get((out, stats, n))  # the window's one host read
    seconds = time.perf_counter() - began
    self.host_reads += 1
    n = int(n)
    tokens = [[int(t) for t in out[:n, row] if t >= 0] for row in range(len(batch))]
    return WindowResult(tokens, n, seconds, steps.TRACES["decode_window"] != traces, stats)

  def arena_lost(self) -> bool:
    """A failed call that had the arena donated leaves it deleted."""
    return any(x.is_deleted() for x in jax.tree.leaves(self.arena.kv))

  # ------------------------------------------------------------------------------------------ warm-up

  def warmup_shapes(self, kind: str, context: int, max_batch: int, prefill_tokens: int, prefill_chunk: int):
    """The shapes a server meets first: prefills of first chunks (a chunk starting at 0 has the smallest table
    that holds it) for every rows x span the token budget allows, and decode windows of `kind` for every batch
    bucket and table width up to `context` tokens. Later chunks of long prompts compile when first met (and
    the persistent cache keeps them for the next start)."""
    shapes = []
    span = MIN_SPAN
    while span <= bucket(prefill_chunk, MIN_SPAN):
      rows = 1
      while rows <= bucket(max_batch) and rows * span <= max(prefill_tokens, MIN_SPAN):
        shapes.append(("prefill", rows, span, bucket(-(-span // self.arena.block_size), MIN_TABLE_WIDTH)))
        rows *= 2
      span *= 2
    widths = sorted({bucket(-(-n // self.arena.block_size), MIN_TABLE_WIDTH)
                     for n in range(self.arena.block_size, max(context, self.arena.block_size) + 1,
                                    self.arena.block_size)})
    rows = 1
    while True:
      size = max(rows, parallel.data_size(self.mesh))
      shapes.extend(("decode", size, width, kind) for width in widths)
      if rows >= bucket(max_batch):
        break
      rows *= 2
    return list(dict.fromkeys(shapes))

  def compile_shape(self, shape) -> None:
    """Runs the call of `shape` with padding rows only, which write nothing: the arena is untouched and the
    compiled code is the one real requests of that shape use."""
    if shape[0] == "prefill":
      _, rows, span, width = shape
      self.arena.kv, token = steps.prefill_chunk(
          self._graphdef, self._state, self.arena.kv, jnp.zeros((self.arena.num_layers, rows, width), jnp.int32),
          jnp.zeros((rows, span), jnp.int32), jnp.zeros(rows, jnp.int32), jnp.zeros(rows, jnp.int32),
          self._sampling([], rows), mesh=self.mesh)
      jax.block_until_ready(token)
      return
    _, size, width, kind = shape
    zeros = jnp.zeros(size, jnp.int32)
    self.arena.kv, out, *_ = steps.decode_window(
        self._graphdef, self._state, self.arena.kv, jnp.zeros((self.arena.num_layers, size, width), jnp.int32),
        steps.WindowState(zeros, zeros, jnp.zeros(size, bool), zeros),
        jnp.full((size, MIN_STOP_COLUMNS), -1, jnp.int32),
        self._sampling([], size), jnp.ones(size, jnp.float32), self._layers, jnp.int32(0),
        attention=self.backends[kind], num_steps=self.window, mesh=self.mesh)
    jax.block_until_ready(out)
