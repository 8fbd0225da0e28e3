"""Synthetic paged decode inputs with the shape of real attention: a sink, a local window and a few heavy
blocks over a background of weak keys. Used by the tests and the kernel benchmark."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from psa_jax.pallas_kernels.summaries import BlockSummaries, update_summaries


class DecodeInputs(NamedTuple):
  q: jax.Array  # [B, Hq, D]
  k_pages: jax.Array  # [H, P, S, D]
  v_pages: jax.Array  # [H, P, S, D]
  block_table: jax.Array  # [B, M]
  lengths: jax.Array  # [B]
  summaries: BlockSummaries  # each [H, P, D]


def synthetic_decode_inputs(
    seed: int,
    lengths: Sequence[int],
    *,
    q_heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 32,
    block_size: int = 16,
    max_blocks: int | None = None,
    spare_pages: int = 3,
    heavy_blocks: int = 3,
    strength: float = 2.0,
    dtype=jnp.float32,
) -> DecodeInputs:
  """Random paged cache where each sequence's pages are scattered through a shared pool.

  strength: how far the heavy keys lean towards the queries (0 gives unstructured random attention).
  """
  rng = np.random.default_rng(seed)
  lengths = np.asarray(lengths, np.int32)
  batch = len(lengths)
  blocks = np.maximum(1, -(-lengths // block_size))
  width = int(max_blocks or blocks.max())
  num_pages = int(blocks.sum()) + spare_pages
  perm = rng.permutation(num_pages)
  table = np.zeros((batch, width), np.int32)
  start = 0
  for b in range(batch):
    table[b, : blocks[b]] = perm[start : start + blocks[b]]
    start += blocks[b]

  q = rng.normal(size=(batch, q_heads, head_dim))
  k = rng.normal(size=(kv_heads, num_pages, block_size, head_dim))
  v = rng.normal(size=(kv_heads, num_pages, block_size, head_dim))
  group = q_heads // kv_heads
  direction = q.reshape(batch, kv_heads, group, head_dim).mean(axis=2)
  direction /= np.linalg.norm(direction, axis=-1, keepdims=True) + 1e-6
  for b in range(batch):
    n = int(-(-lengths[b] // block_size))
    if n == 0:
      continue
    special = {0, n - 1} | set(rng.choice(n, size=min(heavy_blocks, n), replace=False).tolist())
    for j in special:
      page = table[b, j]
      lean = strength * np.sqrt(head_dim) * rng.uniform(0.5, 1.0)
      k[:, page] += lean * direction[b][:, None, :]
  k_pages, v_pages = jnp.asarray(k, dtype), jnp.asarray(v, dtype)
  counts = np.clip(lengths[:, None] - np.arange(width)[None, :] * block_size, 0, block_size)
  summaries = update_summaries(
      BlockSummaries.zeros(kv_heads, num_pages, head_dim, dtype), k_pages, v_pages,
      jnp.asarray(table.reshape(-1)), jnp.asarray(counts.reshape(-1)))
  return DecodeInputs(jnp.asarray(q, dtype), k_pages, v_pages, jnp.asarray(table),
                      jnp.asarray(lengths), summaries)
