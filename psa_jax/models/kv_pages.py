"""The paged KV cache as the model sees it: one pool of pages shared by every layer and sequence.

  k, v:       [kv_heads, num_pages, block_size, head_dim], in the KV dtype or packed bfloat16 (CPU; see
              psa_jax/pallas_kernels/storage.py: written through `pack`, read through `unpack`)
  summaries:  BlockSummaries, each [kv_heads, num_pages, head_dim]
A block table [layers, batch, max_blocks] maps (layer, sequence, logical block) to a page; who owns which page
is the serving arena's business (psa_jax/serving/), not the model's.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from psa_jax.pallas_kernels.storage import pack, unpack
from psa_jax.pallas_kernels.summaries import BlockSummaries, update_summaries


class PagedKV(NamedTuple):
  k: jax.Array
  v: jax.Array
  summaries: BlockSummaries

  @classmethod
  def zeros(cls, kv_heads: int, num_pages: int, block_size: int, head_dim: int, dtype=jnp.bfloat16) -> "PagedKV":
    """An empty pool whose pages are stored as `dtype` (a storage dtype: `storage.storage_dtype(kv_dtype)`)."""
    # Distinct buffers: the arena is donated, and one buffer may not be donated twice.
    pages = lambda: jnp.zeros((kv_heads, num_pages, block_size, head_dim), dtype)
    return cls(pages(), pages(), BlockSummaries.zeros(kv_heads, num_pages, head_dim, dtype))

  @property
  def block_size(self) -> int:
    return self.k.shape[2]

  @property
  def num_pages(self) -> int:
    return self.k.shape[1]


def write_tokens(
    kv: PagedKV,
    k_new: jax.Array,  # [B, T, H, D]
    v_new: jax.Array,  # [B, T, H, D]
    block_table: jax.Array,  # [B, M] this layer's table
    start: jax.Array,  # [B] position of k_new[:, 0]
    num: jax.Array,  # [B] valid tokens of the T (ragged; 0 leaves the sequence alone)
) -> PagedKV:
  """Scatters a span of new tokens into their pages and refreshes the touched pages' summaries."""
  b, t, _, _ = k_new.shape
  s = kv.block_size
  m = block_table.shape[1]
  pos = start[:, None] + jnp.arange(t)[None, :]  # [B, T]
  valid = jnp.arange(t)[None, :] < num[:, None]
  page = jnp.take_along_axis(block_table, jnp.clip(pos // s, 0, m - 1), axis=1)
  page = jnp.where(valid, page, kv.num_pages)  # out of bounds: dropped by the scatter
  slot = pos % s
  put = lambda pages, new: pages.at[:, page, slot].set(pack(jnp.moveaxis(new, 2, 0), pages.dtype), mode="drop")
  k, v = put(kv.k, k_new), put(kv.v, v_new)

  n_cols = (t + s - 1) // s + 1  # blocks a span of t tokens can touch
  cols = (start // s)[:, None] + jnp.arange(n_cols)[None, :]  # [B, n_cols]
  end = (start + num)[:, None]
  counts = jnp.where((cols * s < end) & (num[:, None] > 0), jnp.clip(end - cols * s, 0, s), 0)
  pages = jnp.take_along_axis(block_table, jnp.clip(cols, 0, m - 1), axis=1)
  summaries = update_summaries(kv.summaries, k, v, pages.reshape(-1), counts.reshape(-1))
  return PagedKV(k, v, summaries)


def gather_context(pages: jax.Array, block_table: jax.Array) -> jax.Array:
  """Contiguous keys or values of each sequence: [B, H, M * S, D] from pages [H, P, S, D] and table [B, M]."""
  h, _, s, d = pages.shape
  b, m = block_table.shape
  ctx = unpack(pages[:, jnp.clip(block_table, 0, pages.shape[1] - 1)])  # [H, B, M, S, D]
  return jnp.moveaxis(ctx, 0, 1).reshape(b, h, m * s, d)
