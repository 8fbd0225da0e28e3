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

from psa_jax.backend import AttentionBackend, dense_head_mask
from psa_jax.config import DenseConfig, PSAConfig, TopKConfig
from psa_jax.models import parallel
from psa_jax.models.llama import Decoder
from psa_jax.serving import steps
from psa_jax.serving.arena import KVArena
from psa_jax.serving.grammar import GrammarTable
from psa_jax.serving.request import Request, TokenLogprob
from psa_jax.serving.scheduler import MIN_SPAN, Chunk, bucket

MIN_TABLE_WIDTH = 8  # blocks; coarse buckets keep the number of compiled shapes small
MIN_STOP_COLUMNS = 4  # stop token ids per sequence: models have one to a few


@dataclasses.dataclass
class WindowResult:
  tokens: list[list[int]]  # per request of the batch, what it emitted (-1 padding removed)
  logprobs: list[list[TokenLogprob] | None]  # per request, per emitted token, where the request asked
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
    for backend in backends.values():  # a dense head outside the model fails here, not in the first step
      dense_head_mask(backend, model.config.num_layers, model.config.num_kv_heads)
    self._graphdef, self._state = nnx.split(model)
    self._layers = model.split_layers() if split_layers else None  # see psa_jax/models/llama.py
    self.grammars = GrammarTable(model.config.vocab_size)
    self.host_reads = 0

  @staticmethod
  def make_backends(defaults) -> dict[str, AttentionBackend]:
    """The three attention kinds a request may pick, with the engine's defaults (AttentionDefaults)."""
    return {
        "dense": AttentionBackend("dense", DenseConfig(), defaults.impl),
        "topk": AttentionBackend("topk", TopKConfig(k_blocks=defaults.topk_blocks), defaults.impl,
                                 defaults.dense_layers),
        "psa": AttentionBackend("psa", PSAConfig(tau=defaults.psa_tau), defaults.impl, defaults.dense_layers,
                                defaults.psa_dense_heads),
    }

  def _sampling(self, requests: list[Request], size: int) -> steps.SamplingArrays:
    pad = size - len(requests)
    col = lambda f, dtype, fill=0: jnp.asarray(np.array([f(r.params) for r in requests] + [fill] * pad, dtype))
    return steps.SamplingArrays(
        col(lambda p: p.seed, np.int32), col(lambda p: p.temperature, np.float32),
        col(lambda p: p.top_p, np.float32, 1.0), col(lambda p: p.top_k, np.int32),
        col(lambda p: p.min_p, np.float32), col(lambda p: p.presence_penalty, np.float32),
        col(lambda p: p.frequency_penalty, np.float32), col(lambda p: p.repetition_penalty, np.float32, 1.0))

  def _stop_ids(self, requests: list[Request], size: int) -> jax.Array:
    stop = np.full((size, bucket(max(len(r.stop_ids) for r in requests), MIN_STOP_COLUMNS)), -1, np.int32)
    for row, r in enumerate(requests):
      stop[row, : len(r.stop_ids)] = r.stop_ids
    return jnp.asarray(stop)

  def _min_left(self, requests: list[Request], size: int) -> jax.Array:
    pad = size - len(requests)
    return jnp.asarray(np.array([max(0, r.params.min_tokens - len(r.output)) for r in requests] + [0] * pad,
                                np.int32))

  def _penalties(self, requests: list[Request], size: int) -> steps.Penalties | None:
    """Token counts of each output and the prompt's tokens, when some request of the batch has a penalty."""
    if not any(r.params.penalized for r in requests):
      return None
    vocab = self.model.config.vocab_size
    counts = np.zeros((size, vocab), np.int32)
    seen = np.zeros((size, vocab), bool)
    for row, r in enumerate(requests):
      if r.output:
        counts[row] = np.bincount(np.asarray(r.output), minlength=vocab)[:vocab]
      seen[row, np.asarray(r.prompt)] = True
    return steps.Penalties(jnp.asarray(counts), jnp.asarray(seen))

  def _constraint(self, requests: list[Request], size: int):
    return self.grammars.constraint([r.params.grammar for r in requests], [r.grammar_state for r in requests],
                                    size)

  @staticmethod
  def _num_logprobs(requests: list[Request]) -> int:
    return steps.LOGPROBS_K if any(r.params.logprobs is not None for r in requests) else 0

  @staticmethod
  def _token_logprob(lp: steps.Logprobs, index, n: int | None) -> TokenLogprob | None:
    if n is None:
      return None
    return TokenLogprob(float(lp.token[index]),
                        tuple((int(i), float(v)) for i, v in zip(lp.top_ids[index][:n], lp.top[index][:n])))

  # The two calls, spelled once: the warm-up must make exactly the calls requests make (the same arguments,
  # positional and keyword) or jit's cache would not recognise them.
  def _run_prefill(self, tables, tokens, start, num, sampling, stop, min_left, penalties, targets, constraint,
                   num_logprobs, prompt_logprobs):
    self.arena.kv, *out = steps.prefill_chunk(
        self._graphdef, self._state, self.arena.kv, tables, tokens, start, num, sampling, stop, min_left, penalties,
        targets, constraint, mesh=self.mesh, num_logprobs=num_logprobs, prompt_logprobs=prompt_logprobs)
    return out

  def _run_decode(self, kind, tables, window, stop, sampling, tau, limit, penalties, constraint, num_logprobs):
    self.arena.kv, out, _, stats, n, lp, grammar_state = steps.decode_window(
        self._graphdef, self._state, self.arena.kv, tables, window, stop, sampling, tau, self._layers, limit,
        penalties, constraint, attention=self.backends[kind], num_steps=self.window, mesh=self.mesh,
        num_logprobs=num_logprobs)
    return out, stats, n, lp, grammar_state

  def prefill_shape(self, chunks: list[Chunk]) -> tuple[int, int, int]:
    """(rows, span, table width) of the call that prefills these chunks."""
    rows = bucket(len(chunks))
    span = bucket(max(ch.length for ch in chunks), MIN_SPAN)
    # Causal: a chunk sees only the blocks up to its end, so the table (and the attention) stop there.
    covered = max(-(-(ch.start + ch.length) // self.arena.block_size) for ch in chunks)
    return rows, span, bucket(covered, MIN_TABLE_WIDTH)

  def prefill(self, chunks: list[Chunk]) -> list[tuple[int, TokenLogprob | None] | None]:
    """Writes the chunks' tokens into the arena in one call. Returns, per chunk, (the sampled next token, its
    log-probabilities if asked for) where the chunk ends its context, else None. Prompt log-probabilities, when
    asked for, are appended to each request's `prompt_logprobs`. One host read, only when it is needed."""
    rows, span, width = self.prefill_shape(chunks)
    requests = [ch.request for ch in chunks]
    tokens = np.zeros((rows, span), np.int32)
    targets = np.full((rows, span), -1, np.int32)
    start = np.zeros(rows, np.int32)
    num = np.zeros(rows, np.int32)
    for row, ch in enumerate(chunks):
      context = ch.request.context
      tokens[row, : ch.length] = context[ch.start : ch.start + ch.length]
      after = context[ch.start + 1 : ch.start + ch.length + 1]
      targets[row, : len(after)] = after
      start[row], num[row] = ch.start, ch.length
    ids = [ch.request.id for ch in chunks] + [None] * (rows - len(chunks))
    prompt_lp = any(r.params.prompt_logprobs is not None for r in requests)
    num_logprobs = self._num_logprobs(requests)
    sampled, token_lp, prompt, grammar_state = self._run_prefill(
        jnp.asarray(self.arena.block_tables(ids, width)), jnp.asarray(tokens), jnp.asarray(start), jnp.asarray(num),
        self._sampling(requests, rows), self._stop_ids(requests, rows), self._min_left(requests, rows),
        self._penalties(requests, rows), jnp.asarray(targets) if prompt_lp else None,
        self._constraint(requests, rows), num_logprobs, prompt_lp)
    if not any(ch.last for ch in chunks) and not prompt_lp:
      return [None] * len(chunks)
    sampled, token_lp, prompt, grammar_state = jax.device_get((sampled, token_lp, prompt, grammar_state))
    self.host_reads += 1
    results = []
    for row, ch in enumerate(chunks):
      n_prompt = ch.request.params.prompt_logprobs
      if n_prompt is not None and ch.start < len(ch.request.prompt):
        if ch.start == 0:
          ch.request.prompt_logprobs = [None]  # nothing predicts the first token
        for t in range(min(ch.length, len(ch.request.prompt) - 1 - ch.start)):
          ch.request.prompt_logprobs.append(self._token_logprob(prompt, (row, t), n_prompt))
      if ch.last:
        self._follow_grammar(ch.request, grammar_state, row)
        lp = self._token_logprob(token_lp, row, ch.request.params.logprobs) if token_lp is not None else None
        results.append((int(sampled[row]), lp))
      else:
        results.append(None)
    return results

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
        jnp.asarray(np.array([r.remaining_tokens for r in batch] + [0] * pad, np.int32)),
        self._min_left(batch, size))
    tau = jnp.asarray(np.array([r.tau for r in batch] + [1.0] * pad, np.float32))
    traces = steps.TRACES["decode_window"]
    began = time.perf_counter()
    out, stats, n, lp, grammar_state = self._run_decode(
        kind, jnp.asarray(self.arena.block_tables(ids, width)), window, self._stop_ids(batch, size),
        self._sampling(batch, size), tau, jnp.int32(limit), self._penalties(batch, size),
        self._constraint(batch, size), self._num_logprobs(batch))
    # the window's one host read
    out, stats, n, lp, grammar_state = jax.device_get((out, stats, n, lp, grammar_state))
    seconds = time.perf_counter() - began
    self.host_reads += 1
    n = int(n)
    tokens, logprobs = [], []
    for row, r in enumerate(batch):
      self._follow_grammar(r, grammar_state, row)
      steps_taken = [i for i in range(n) if out[i, row] >= 0]
      tokens.append([int(out[i, row]) for i in steps_taken])
      logprobs.append([self._token_logprob(lp, (i, row), r.params.logprobs) for i in steps_taken]
                      if lp is not None and r.params.logprobs is not None else None)
    return WindowResult(tokens, logprobs, n, seconds, steps.TRACES["decode_window"] != traces, stats)

  def _follow_grammar(self, request: Request, grammar_state, row: int) -> None:
    """Stores where the device left the request's automaton (global state id back to the automaton's own)."""
    if request.params.grammar is not None:
      request.grammar_state = int(grammar_state[row]) - self.grammars.offset(request.params.grammar)

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
    i32 = lambda *dims: jnp.zeros(dims, jnp.int32)
    no_stops = lambda rows: jnp.full((rows, MIN_STOP_COLUMNS), -1, jnp.int32)
    layers = self.arena.num_layers
    if shape[0] == "prefill":
      _, rows, span, width = shape
      out = self._run_prefill(i32(layers, rows, width), i32(rows, span), i32(rows), i32(rows), self._sampling([], rows),
                              no_stops(rows), i32(rows), None, None, None, 0, False)
    else:
      _, size, width, kind = shape
      window = steps.WindowState(i32(size), i32(size), jnp.zeros(size, bool), i32(size), i32(size))
      out = self._run_decode(kind, i32(layers, size, width), window, no_stops(size), self._sampling([], size),
                             jnp.ones(size, jnp.float32), jnp.int32(0), None, None, 0)
    jax.block_until_ready(out)
