"""The engine's two compiled device functions. Both donate the KV arena, so it is updated in place.

  prefill_chunk: spans of prompt tokens of a batch of sequences (ragged: each row has its own start and length)
    into the arena; samples each row's token after its span.
  decode_window: up to `limit` (at most `num_steps`) decode steps for the whole batch inside one
    `lax.while_loop`, stopping early when every sequence is done. The host reads the window's tokens once, at
    the end. `limit` is an argument, not a shape: the scheduler sizes each window without a new compile.

Sampling is whole on device (psa_jax/models/sampling.py): penalties carry their token counts through the window,
min_tokens bans stop tokens until enough are out, grammars (grammar.py) mask what the output may not say and
follow each sampled token, and log-probabilities come back with the tokens. Penalties and
log-probabilities are static switches (`Penalties` present or None, `num_logprobs`): a batch that asks for
neither runs the plain step.

Shapes are bucketed by the runner (batch B, block table width M, span T), so new requests reuse compiled code.
`TRACES` counts traces per function: a trace is a compile, and tests assert that a warm engine does none.
"""

from __future__ import annotations

import collections
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from psa_jax.models.kv_pages import PagedKV
from psa_jax.models.sampling import ban, logprobs, penalize, sample
from psa_jax.serving import grammar
from psa_jax.serving.grammar import Constraint
from psa_jax.serving.request import MAX_LOGPROBS

TRACES: collections.Counter = collections.Counter()
LOGPROBS_K = MAX_LOGPROBS  # top log-probabilities computed per token when a batch asks for any


class SamplingArrays(NamedTuple):
  """Per-sequence sampling settings, each [B]."""

  seed: jax.Array
  temperature: jax.Array
  top_p: jax.Array
  top_k: jax.Array
  min_p: jax.Array
  presence: jax.Array
  frequency: jax.Array
  repetition: jax.Array


class Penalties(NamedTuple):
  """What the penalties look at, per sequence: counts [B, V] int32 of each token in the output so far, and
  prompt_seen [B, V] bool."""

  counts: jax.Array
  prompt_seen: jax.Array


class Logprobs(NamedTuple):
  """Per emitted token: the model's log-probability of it [..., ] and its LOGPROBS_K likeliest tokens."""

  token: jax.Array
  top_ids: jax.Array
  top: jax.Array


def _host_readable(tree, mesh):
  """What the host reads back is replicated over the mesh, so every process of a multi-host run holds it all."""
  if mesh is None:
    return tree
  return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, PartitionSpec()))


def _choose(logits, sampling: SamplingArrays, positions, penalties, stop_ids, min_left, constraint):
  """The sampled tokens [B] from raw logits [B, V]."""
  if penalties is not None:
    logits = penalize(logits, penalties.counts, penalties.prompt_seen, sampling.presence, sampling.frequency,
                      sampling.repetition)
  logits = grammar.constrain(logits, constraint)
  # Most batches have no min_tokens left to honour: skip the [B, V] mask on device then.
  banned = jax.lax.cond(jnp.any(min_left > 0), lambda: ban(logits, stop_ids, min_left > 0), lambda: logits)
  if constraint is not None:  # where the grammar allows only a stop token, the grammar wins over min_tokens
    banned = jnp.where(jnp.any(banned > -jnp.inf, axis=-1, keepdims=True), banned, logits)
  logits = banned
  return sample(logits, sampling.seed, positions, sampling.temperature, sampling.top_p, sampling.top_k,
                sampling.min_p)


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "num_logprobs", "prompt_logprobs"),
                   donate_argnames=("kv",))
def prefill_chunk(graphdef, state, kv: PagedKV, tables, tokens, start, num, sampling: SamplingArrays,
                  stop_ids=None, min_left=None, penalties: Penalties | None = None, targets=None,
                  constraint: Constraint | None = None, *, mesh=None, num_logprobs: int = 0,
                  prompt_logprobs: bool = False):
  """tables [L, B, M]; tokens [B, T]; start, num [B] (num 0: a padding row, which writes nothing); stop_ids
  [B, K] and min_left [B] (stop tokens are banned where min_left > 0); targets [B, T]: the token after each
  position (-1 where none), for prompt_logprobs; constraint: None, or the grammars the sampled tokens obey.

  Returns (kv, next token [B], its Logprobs or None, the prompt's Logprobs [B, T] or None, the grammar states
  [B] after the next token or None).
  """
  TRACES["prefill_chunk"] += 1
  model = nnx.merge(graphdef, state)
  b = tokens.shape[0]
  x, kv = model.prefill(tokens, start, num, kv, tables, mesh=mesh)
  last = jnp.take_along_axis(x, (num - 1)[:, None, None], axis=1)[:, 0]  # [B, E]
  logits = model.logits(last)
  stop_ids = jnp.full((b, 1), -1, jnp.int32) if stop_ids is None else stop_ids
  min_left = jnp.zeros((b,), jnp.int32) if min_left is None else min_left
  token = _choose(logits, sampling, start + num, penalties, stop_ids, min_left, constraint)
  token_lp = Logprobs(*logprobs(logits, token, num_logprobs)) if num_logprobs else None
  prompt_lp = Logprobs(*logprobs(model.logits(x), targets, LOGPROBS_K)) if prompt_logprobs else None
  constraint = grammar.advance(constraint, token, num > 0)
  grammar_state = None if constraint is None else constraint.state
  return kv, *_host_readable((token, token_lp, prompt_lp, grammar_state), mesh)


class WindowState(NamedTuple):
  """Per-sequence decode state, each [B]."""

  tokens: jax.Array  # last token, the next step's input
  positions: jax.Array  # where that token goes
  active: jax.Array  # bool
  remaining: jax.Array  # tokens the sequence may still emit
  min_left: jax.Array  # tokens still to emit before a stop token may end it (min_tokens)


class WindowStats(NamedTuple):
  blocks_sum: jax.Array  # [L] blocks read, summed over active sequences, KV heads and steps
  blocks_sq: jax.Array  # [L] sum of squares, for the spread
  blocks_total: jax.Array  # [] blocks dense attention would have read (per layer, summed likewise)
  samples: jax.Array  # [] (sequence, KV head, step) samples per layer


@functools.partial(jax.jit, static_argnames=("graphdef", "attention", "num_steps", "mesh", "num_logprobs"),
                   donate_argnames=("kv",))
def decode_window(graphdef, state, kv: PagedKV, tables, window: WindowState, stop_ids, sampling: SamplingArrays,
                  tau, layers=None, limit=None, penalties: Penalties | None = None,
                  constraint: Constraint | None = None, *, attention, num_steps: int, mesh=None,
                  num_logprobs: int = 0):
  """tables [L, B, M]; stop_ids [B, K] (-1 padded); tau [B]; layers: None or `Decoder.split_layers()` (see
  `Decoder.decode`); limit: [] int32 steps to run at most (None: num_steps); penalties: None, or the state the
  window's penalties start from. mesh: see psa_jax/models/parallel.py.

  Returns (kv, tokens [num_steps, B] (-1 where a sequence emitted nothing), final WindowState, WindowStats,
  steps run [], Logprobs [num_steps, B, ...] or None).
  """
  TRACES["decode_window"] += 1
  model = nnx.merge(graphdef, state)
  b = window.tokens.shape[0]
  num_layers = tables.shape[0]
  num_kv_heads = kv.k.shape[0]
  block_size = kv.k.shape[2]
  k = max(num_logprobs, 1)

  def step(carry):
    i, kv, w, out, stats, penalties, lp_out, constraint = carry
    logits, kv, used = model.decode(w.tokens, w.positions, kv, tables, attention, tau, w.active, mesh=mesh,
                                    layers=layers)
    token = _choose(logits, sampling, w.positions + 1, penalties, stop_ids, w.min_left, constraint)
    token = jnp.where(w.active, token, w.tokens)
    constraint = grammar.advance(constraint, token, w.active)
    out = out.at[i].set(jnp.where(w.active, token, -1))
    if num_logprobs:
      lp_out = jax.tree.map(lambda acc, new: acc.at[i].set(new), lp_out, Logprobs(*logprobs(logits, token, k)))
    if penalties is not None:
      counts = penalties.counts.at[jnp.arange(b), token].add(w.active.astype(jnp.int32))
      penalties = penalties._replace(counts=counts)
    stopped = jnp.any(token[:, None] == stop_ids, axis=-1)
    remaining = w.remaining - w.active
    positions = w.positions + w.active
    active = w.active & ~stopped & (remaining > 0)
    min_left = jnp.maximum(w.min_left - w.active, 0)

    weight = w.active.astype(jnp.float32)[None, :, None]  # [1, B, 1]
    used = used.astype(jnp.float32)
    n_blocks = ((w.positions + block_size) // block_size).astype(jnp.float32)  # blocks of positions + 1 tokens
    stats = WindowStats(
        stats.blocks_sum + jnp.sum(used * weight, axis=(1, 2)),
        stats.blocks_sq + jnp.sum(used * used * weight, axis=(1, 2)),
        stats.blocks_total + jnp.sum(n_blocks * w.active) * num_kv_heads,
        stats.samples + jnp.sum(w.active) * num_kv_heads)
    return (i + 1, kv, WindowState(token, positions, active, remaining, min_left), out, stats, penalties,
            lp_out, constraint)

  bound = num_steps if limit is None else jnp.minimum(limit, num_steps)

  def cond(carry):
    i, _, w, *_ = carry
    return (i < bound) & jnp.any(w.active)

  out = jnp.full((num_steps, b), -1, jnp.int32)
  zeros = jnp.zeros((num_layers,), jnp.float32)
  stats = WindowStats(zeros, zeros, jnp.float32(0), jnp.float32(0))
  lp_out = (Logprobs(jnp.zeros((num_steps, b)), jnp.zeros((num_steps, b, k), jnp.int32),
                     jnp.zeros((num_steps, b, k))) if num_logprobs else None)
  steps, kv, window, out, stats, _, lp_out, constraint = jax.lax.while_loop(
      cond, step, (jnp.int32(0), kv, window, out, stats, penalties, lp_out, constraint))
  grammar_state = None if constraint is None else constraint.state
  return kv, *_host_readable((out, window, stats, steps, lp_out, grammar_state), mesh)
