"""Per-block summaries: the small side buffer that block scoring and the stopping rule read instead of the KV.

Layout (beside the KV pages `[kv_heads, num_pages, block_size, head_dim]`), each [kv_heads, num_pages, head_dim]:
  kmin, kmax:  per-channel min and max of the block's keys (Quest's box);
  hmin, hmax:  the same box shrunk halfway toward the mean key, (kmin + kmean) / 2 and (kmax + kmean) / 2;
  vmean:       mean of the block's values.
All are stored like the pages (packed for a packed pool, storage.py).

Every block score is one bound over a box, q+ . upper + q- . lower (two matmuls, one row of head_dim per block
and operand), so each score kind stores exactly the two rows it reads: Quest's min/max bound reads kmin/kmax,
the hybrid score (the average of the mean-key logit and that bound) reads hmin/hmax. Computing the hybrid's
operands at scoring time would read three rows per block and add two of them, and that gather, not the
arithmetic, is what scoring costs (PSA's decode attention at 8K, batch 8 on the development VM: 3.75 ms per layer
that way, 2.61 ms with the box stored). The mean key itself is hmin + hmax - (kmin + kmax) / 2 (`mean_keys`),
for the "mean" score, which nothing reads on a hot path.

min/max are exact in the key dtype (they are selections); the means and half-boxes are reduced in float32 and
rounded once. The key summaries rank blocks; the value mean lets PSA estimate what the blocks it has not read
would add to the output (the value-aware stopping rule and tail compensation, stopping.py).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from psa_jax.pallas_kernels.storage import pack, unpack


class BlockSummaries(NamedTuple):
  kmin: jax.Array  # [kv_heads, num_pages, head_dim]
  kmax: jax.Array  # [kv_heads, num_pages, head_dim]
  hmin: jax.Array  # [kv_heads, num_pages, head_dim]
  hmax: jax.Array  # [kv_heads, num_pages, head_dim]
  vmean: jax.Array  # [kv_heads, num_pages, head_dim]

  @classmethod
  def zeros(cls, kv_heads: int, num_pages: int, head_dim: int, dtype=jnp.bfloat16) -> "BlockSummaries":
    z = lambda: jnp.zeros((kv_heads, num_pages, head_dim), dtype)  # distinct buffers, so each can be donated
    return cls(*(z() for _ in cls._fields))


SCORE_KINDS = ("mean", "minmax", "hybrid")


def mean_keys(summaries: BlockSummaries) -> jax.Array:
  """The blocks' mean keys, float32 [kv_heads, num_pages, head_dim], recovered from the boxes."""
  f = lambda x: unpack(x).astype(jnp.float32)
  return f(summaries.hmin) + f(summaries.hmax) - 0.5 * (f(summaries.kmin) + f(summaries.kmax))


def score_box(summaries: BlockSummaries, score: str) -> tuple[jax.Array, jax.Array]:
  """The (lower, upper) rows, each [kv_heads, num_pages, head_dim], that score kind `score` bounds q . k over:
  the block score is q+ . upper + q- . lower (q+ = max(q, 0), q- = min(q, 0)).

  "minmax": Quest's box (kmin, kmax), an upper bound on max_k q . k. "hybrid": the half-box (hmin, hmax), which
  gives 0.5 * (q . kmean + q+ . kmax + q- . kmin), the average of the mean-key logit and Quest's bound. "mean":
  the mean key on both sides (q . kmean), stored like the summaries.
  """
  if score == "minmax":
    return summaries.kmin, summaries.kmax
  if score == "hybrid":
    return summaries.hmin, summaries.hmax
  if score == "mean":
    kmean = pack(mean_keys(summaries), summaries.kmin.dtype)
    return kmean, kmean
  raise ValueError(f"score must be one of {SCORE_KINDS}, got {score!r}")


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
  return BlockSummaries(fix(kmin), fix(kmax), fix(0.5 * (kmin + kmean)), fix(0.5 * (kmax + kmean)), fix(vmean))


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
