"""The engine's two compiled device functions. Both donate the KV arena, so it is updated in place.

  prefill_chunk: spans of prompt tokens of a batch of sequences (ragged: each row has its own start and length)
    into the arena; samples each row's token after its span.
  decode_window: up to `limit` (at most `num_steps`) decode steps for the whole batch inside one
    `lax.while_loop`, stopping early when every sequence is done. The host reads the window's tokens once, at
    the end. `limit` is an argument, not a shape: the scheduler sizes each window without a new compile.

Shapes are bucketed by the engine (batch B, block table width M, span T), so new requests reuse compiled code.
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
from psa_jax.models.sampling import sample

TRACES: collections.Counter = collections.Counter()


class SamplingArrays(NamedTuple):
  """Per-sequence sampling settings, each [B]."""

  seed: jax.Array
  temperature: jax.Array
  top_p: jax.Array
  top_k: jax.Array


def _host_readable(tree, mesh):
  """What the host reads back is replicated over the mesh, so every process of a multi-host run holds it all."""
  if mesh is None:
    return tree
  return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, PartitionSpec()))


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh"), donate_argnames=("kv",))
def prefill_chunk(graphdef, state, kv: PagedKV, tables, tokens, start, num, sampling: SamplingArrays, *,
                  mesh=None):
  """tables [L, B, M]; tokens [B, T]; start, num [B] (num 0: a padding row, which writes nothing).
  Returns (kv, next token [B])."""
  TRACES["prefill_chunk"] += 1
  model = nnx.merge(graphdef, state)
  x, kv = model.prefill(tokens, start, num, kv, tables, mesh=mesh)
  last = jnp.take_along_axis(x, (num - 1)[:, None, None], axis=1)[:, 0]  # [1, E]
  token = sample(model.logits(last), sampling.seed, start + num, sampling.temperature, sampling.top_p,
                 sampling.top_k)
  return kv, _host_readable(token, mesh)


class WindowState(NamedTuple):
  """Per-sequence decode state, each [B]."""

  tokens: jax.Array  # last token, the next step's input
  positions: jax.Array  # where that token goes
  active: jax.Array  # bool
  remaining: jax.Array  # tokens the sequence may still emit


class WindowStats(NamedTuple):
  blocks_sum: jax.Array  # [L] blocks read, summed over active sequences, KV heads and steps
  blocks_sq: jax.Array  # [L] sum of squares, for the spread
  blocks_total: jax.Array  # [] blocks dense attention would have read (per layer, summed likewise)
  samples: jax.Array  # [] (sequence, KV head, step) samples per layer


@functools.partial(jax.jit, static_argnames=("graphdef", "attention", "num_steps", "mesh"),
                   donate_argnames=("kv",))
def decode_window(graphdef, state, kv: PagedKV, tables, window: WindowState, stop_ids, sampling: SamplingArrays,
                  tau, layers=None, limit=None, *, attention, num_steps: int, mesh=None):
  """tables [L, B, M]; stop_ids [B, K] (-1 padded); tau [B]; layers: None or `Decoder.split_layers()` (see
  `Decoder.decode`); limit: [] int32 steps to run at most (None: num_steps). mesh: see
  psa_jax/models/parallel.py.

  Returns (kv, tokens [num_steps, B] (-1 where a sequence emitted nothing), final WindowState, WindowStats,
  steps run []).
  """
  TRACES["decode_window"] += 1
  model = nnx.merge(graphdef, state)
  b = window.tokens.shape[0]
  num_layers = tables.shape[0]
  num_kv_heads = kv.k.shape[0]
  block_size = kv.k.shape[2]

  def step(carry):
    i, kv, w, out, stats = carry
    logits, kv, used = model.decode(w.tokens, w.positions, kv, tables, attention, tau, w.active, mesh=mesh,
                                      layers=layers)
    token = sample(logits, sampling.seed, w.positions + 1, sampling.temperature, sampling.top_p, sampling.top_k)
    token = jnp.where(w.active, token, w.tokens)
    out = out.at[i].set(jnp.where(w.active, token, -1))
    stopped = jnp.any(token[:, None] == stop_ids, axis=-1)
    remaining = w.remaining - w.active
    positions = w.positions + w.active
    active = w.active & ~stopped & (remaining > 0)

    weight = w.active.astype(jnp.float32)[None, :, None]  # [1, B, 1]
    used = used.astype(jnp.float32)
    n_blocks = ((w.positions + block_size) // block_size).astype(jnp.float32)  # blocks of positions + 1 tokens
    stats = WindowStats(
        stats.blocks_sum + jnp.sum(used * weight, axis=(1, 2)),
        stats.blocks_sq + jnp.sum(used * used * weight, axis=(1, 2)),
        stats.blocks_total + jnp.sum(n_blocks * w.active) * num_kv_heads,
        stats.samples + jnp.sum(w.active) * num_kv_heads)
    return i + 1, kv, WindowState(token, positions, active, remaining), out, stats

  def cond(carry):
    i, _, w, _, _ = carry
    return (i < bound) & jnp.any(w.active)

  bound = num_steps if limit is None else jnp.minimum(limit, num_steps)
  out = jnp.full((num_steps, b), -1, jnp.int32)
  zeros = jnp.zeros((num_layers,), jnp.float32)
  stats = WindowStats(zeros, zeros, jnp.float32(0), jnp.float32(0))
  steps, kv, window, out, stats = jax.lax.while_loop(cond, step, (jnp.int32(0), kv, window, out, stats))
  return kv, *_host_readable((out, window, stats, steps), mesh)
