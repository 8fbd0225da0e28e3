"""Per-block summaries: the small side buffer that block scoring and the stopping rule read instead of the KV.

Layout (beside the KV pages `[kv_heads, num_pages, block_size, head_dim]`), each [kv_heads, num_pages, head_dim]:
  kmin, kmax:  per-channel min and max of the block's keys (Quest's box);
  kmean:       mean of the block's keys;
  kvar:        per-channel variance of the block's keys;
  vmean:       mean of the block's values.
All are stored like the pages (packed for a packed pool, storage.py).

Every block score is a function of a few of these rows, one row of head_dim per block and row (SCORE_ROWS), and
`block_score` is its one definition: the reference and the Pallas kernel both call it, each with its own dot
product. Gathering the rows, not the arithmetic, is what scoring costs, so each kind reads only the rows it needs.

min/max are exact in the key dtype (they are selections); the means and variances are reduced in float32 and
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
  kmean: jax.Array  # [kv_heads, num_pages, head_dim]
  kvar: jax.Array  # [kv_heads, num_pages, head_dim]
  vmean: jax.Array  # [kv_heads, num_pages, head_dim]

  @classmethod
  def zeros(cls, kv_heads: int, num_pages: int, head_dim: int, dtype=jnp.bfloat16) -> "BlockSummaries":
    z = lambda: jnp.zeros((kv_heads, num_pages, head_dim), dtype)  # distinct buffers, so each can be donated
    return cls(*(z() for _ in cls._fields))


SCORE_KINDS = ("mean", "minmax", "hybrid", "spread")
# The summary rows each score kind reads, in the order `block_score` takes them.
SCORE_ROWS = {"mean": ("kmean",), "minmax": ("kmin", "kmax"), "hybrid": ("kmin", "kmax", "kmean"),
              "spread": ("kmean", "kvar")}
# "spread": how many standard deviations above its mean logit a block's score sits.
SPREAD_SIGMAS = 3.0


def score_rows(summaries: BlockSummaries, score: str) -> tuple[jax.Array, ...]:
  """The summary rows, each [kv_heads, num_pages, head_dim], that score kind `score` reads (SCORE_ROWS)."""
  if score not in SCORE_ROWS:
    raise ValueError(f"score must be one of {SCORE_KINDS}, got {score!r}")
  return tuple(getattr(summaries, name) for name in SCORE_ROWS[score])


def block_score(score: str, q: jax.Array, rows: tuple[jax.Array, ...], dot) -> jax.Array:
  """The estimated (unscaled) logit of each block: the one definition of every score kind.

  q: float32 query rows; rows: the kind's summary rows (SCORE_ROWS), float32, gathered however the caller lays
  them out; dot(a, row): for query-shaped `a`, the product of a with each block's row (the caller's layout, e.g.
  [..., G, M]).

  "mean": q . kmean, the mean logit of the block's keys.
  "minmax": Quest's bound q+ . kmax + q- . kmin (q+ = max(q, 0), q- = min(q, 0)), an upper bound on max_k q . k.
  "hybrid": the average of the two.
  "spread": q . kmean + SPREAD_SIGMAS * sqrt(q^2 . kvar), the mean logit plus a few standard deviations of the
    block's logits, their variance estimated from the per-channel key variances as if the channels were
    independent. A block with one sharp key among ordinary ones has a wide spread of logits along the query's
    direction, so it stands out even though its mean does not; Quest's bound widens every block by its full
    per-channel range, which sits ~10 scaled logits above the true maximum on real keys and so scores blocks by
    their range rather than by the keys the query meets.
  """
  if score == "mean":
    (kmean,) = rows
    return dot(q, kmean)
  if score in ("minmax", "hybrid"):
    bound = dot(jnp.maximum(q, 0.0), rows[1]) + dot(jnp.minimum(q, 0.0), rows[0])
    return bound if score == "minmax" else 0.5 * (bound + dot(q, rows[2]))
  if score == "spread":
    kmean, kvar = rows
    return dot(q, kmean) + SPREAD_SIGMAS * jnp.sqrt(jnp.maximum(dot(q * q, kvar), 0.0))
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
  kvar = jnp.sum(jnp.where(valid, jnp.square(keys - kmean[:, :, None]), 0.0), axis=2) / count
  values = unpack(v_pages[:, safe_ids]).astype(jnp.float32)
  vmean = jnp.sum(jnp.where(valid, values, 0.0), axis=2) / count
  empty = (num_tokens <= 0)[None, :, None]
  fix = lambda x: pack(jnp.where(empty, 0.0, x), k_pages.dtype)
  return BlockSummaries(fix(kmin), fix(kmax), fix(kmean), fix(kvar), fix(vmean))


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
