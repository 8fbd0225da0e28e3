"""Per-block summaries: the small side buffer that block scoring and the stopping rule read instead of the KV.

Layout (beside the KV pages `[kv_heads, num_pages, block_size, head_dim]`):
  kmin, kmax, kmean: [kv_heads, num_pages, head_dim], per-channel min, max and mean of the block's keys;
  vmean:             [kv_heads, num_pages, head_dim], mean of the block's values.
All are stored like the pages (packed for a packed pool, storage.py).

min/max are exact in the key dtype (they are selections); the means are reduced in float32 and rounded once.
The key summaries rank blocks; the value mean lets PSA estimate what the blocks it has not read would add to the
output (the value-aware stopping rule and tail compensation, stopping.py).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from psa_jax.pallas_kernels.storage import pack, unpack


class BlockSummaries(NamedTuple):
  kmin: jax.Array  # [kv_heads, num_pages, head_dim]
  kmax: jax.Array  # [kv_heads, num_pages, head_dim]
  kmean: jax.Array  # [kv_heads, num_pages, head_dim]
  vmean: jax.Array  # [kv_heads, num_pages, head_dim]

  @classmethod
  def zeros(cls, kv_heads: int, num_pages: int, head_dim: int, dtype=jnp.bfloat16) -> "BlockSummaries":
    z = lambda: jnp.zeros((kv_heads, num_pages, head_dim), dtype)  # distinct buffers, so each can be donated
    return cls(z(), z(), z(), z())


def summarize_pages(k_pages: jax.Array, v_pages: jax.Array, page_ids: jax.Array,
                    num_tokens: jax.Array) -> BlockSummaries:
  """Summaries of `page_ids`, each holding its first `num_tokens` tokens.

  k_pages, v_pages: [kv_heads, num_pages, block_size, head_dim]; page_ids, num_tokens: [n].
  Returns summaries of shape [kv_heads, n, head_dim]; a page with no tokens gets zeros.
  """
  block_size = k_pages.shape[2]
  safe_ids = jnp.clip(page_ids, 0, k_pages.shape[1] - 1)
  keys = unpack(k_pages[:, safe_ids]).astype(jnp.float32)  # [h, n, s, d]
  valid = (jnp.arange(block_size)[None, :] < num_tokens[:, None])[None, :, :, None]
  kmin = jnp.min(jnp.where(valid, keys, jnp.inf), axis=2)
  kmax = jnp.max(jnp.where(valid, keys, -jnp.inf), axis=2)
  count = jnp.maximum(num_tokens, 1).astype(jnp.float32)[None, :, None]
  kmean = jnp.sum(jnp.where(valid, keys, 0.0), axis=2) / count
  values = unpack(v_pages[:, safe_ids]).astype(jnp.float32)
  vmean = jnp.sum(jnp.where(valid, values, 0.0), axis=2) / count
  empty = (num_tokens <= 0)[None, :, None]
  fix = lambda x: pack(jnp.where(empty, 0.0, x), k_pages.dtype)
  return BlockSummaries(fix(kmin), fix(kmax), fix(kmean), fix(vmean))


def update_summaries(
    summaries: BlockSummaries, k_pages: jax.Array, v_pages: jax.Array, page_ids: jax.Array, num_tokens: jax.Array
) -> BlockSummaries:
  """Folds newly appended tokens into the summaries of the pages they landed in.

  The touched pages are re-reduced from their contents rather than folded incrementally: one page is
  block_size keys, so this reads no more than the append itself wrote, and the result does not depend on how
  the tokens were split into appends (decode, chunked prefill) or on what a reused page held before.

  page_ids, num_tokens: [n] the touched pages and how many valid tokens each now holds. Entries with
  num_tokens <= 0 are padding and leave the summaries untouched.
  """
  fresh = summarize_pages(k_pages, v_pages, page_ids, num_tokens)
  # Padding entries scatter out of bounds and are dropped.
  target = jnp.where(num_tokens > 0, page_ids, k_pages.shape[1])
  return BlockSummaries(*(
      old.at[:, target].set(pack(unpack(new), old.dtype), mode="drop") for old, new in zip(summaries, fresh)
  ))
