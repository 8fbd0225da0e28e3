"""Block scoring (jnp reference) and the visit plan that turns block scores into an order of blocks.

Shared by every path: the Pallas kernels, the XLA path and the oracle all visit blocks in the order this
module computes, so they can be compared block for block.

Shapes: B batch, H kv heads, G query heads per kv head (Gp: G padded), M blocks per sequence, S block size.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from psa_jax.pallas_kernels.storage import unpack
from psa_jax.pallas_kernels.summaries import BlockSummaries, score_box

NEG_INF = float("-inf")


def num_blocks(lengths: jax.Array, block_size: int) -> jax.Array:
  """Blocks holding at least one token: [B]."""
  return (lengths + block_size - 1) // block_size


def block_scores_reference(
    q: jax.Array,  # [B, H, Gp, D]
    summaries: BlockSummaries,  # each [H, P, D]
    block_table: jax.Array,  # [B, M]
    lengths: jax.Array,  # [B]
    *,
    block_size: int,
    score: str,
    sm_scale: float,
    heads: tuple[int, ...] | None = None,
) -> jax.Array:
  """Estimated scaled logit of each block, per query head: [B, H, Gp, M], -inf past the sequence.

  heads: the KV heads of the summaries that q's head axis stands for (None: all of them, in order).

  Every score kind is a bound over a box of keys, q+ . upper + q- . lower (summaries.score_box): "minmax" is
  Quest's bound max_k q . k <= sum_d max(q_d kmin_d, q_d kmax_d); "hybrid" the average of that bound and the
  mean-key logit, which is the same bound over the box shrunk halfway toward the mean key; "mean" q . kmean. The
  bound alone ranks a block by its single most aligned channel mix and overshoots the true maximum by ~10 scaled
  logits on real keys, misranking heavy blocks; the mean logit alone misses blocks with one sharp key. Their
  average ranks the blocks of the default model closer to the exact order than either (BENCHMARKS.md, quality
  study).
  """
  valid = jnp.arange(block_table.shape[1])[None, :] < num_blocks(lengths, block_size)[:, None]  # [B, M]
  pages = jnp.where(valid, block_table, 0)
  # One gather per head (rows of D contiguous values) lands in [B, H, M, D] directly; indexing s[:, pages] gathered
  # [H, D] slices across heads and transposed them after, ~2x slower on cold summaries.
  if heads is None:
    take = lambda s: unpack(jax.vmap(lambda s_h: s_h[pages], out_axes=1)(s)).astype(jnp.float32)  # [B, H, M, D]
  else:  # a gather at each static head, never a slice of the summaries that XLA could copy
    take = lambda s: unpack(jnp.stack([s[h, pages] for h in heads], axis=1)).astype(jnp.float32)
  qf = q.astype(jnp.float32)
  # Block-major product, transposed after: the gathered summaries stay the matmul's left operand in their own
  # layout (as "bhgd,bhmd->bhgm", XLA:CPU copied them transposed first).
  dot = lambda a, k: jnp.swapaxes(jnp.einsum("bhmd,bhgd->bhmg", k, a, precision=jax.lax.Precision.HIGHEST), 2, 3)
  lower, upper = score_box(summaries, score)
  s = dot(jnp.maximum(qf, 0.0), take(upper)) + dot(jnp.minimum(qf, 0.0), take(lower))
  return jnp.where(valid[:, None, None, :], s * sm_scale, NEG_INF)


def _descending_order(crit: jax.Array, forced: jax.Array, valid: jax.Array) -> jax.Array:
  """Block ids [..., M]: forced blocks first, then valid ones by descending `crit` (in [0, 1]), then the rest;
  ties in ascending id.

  One sort of packed int32 keys: the high bits rank the block (the float32 bits of a non-negative `crit` order
  like the value), the low ceil(log2 M) bits hold its id. Dropping that many low mantissa bits merges values
  closer than ~2^(log2 M - 23) relative, which then go by id. XLA:CPU sorts one int32 operand ~5x faster than
  the (value, id) pair of an argsort (0.04 vs 0.2 ms for [3, 512] on the development VM).
  """
  m = crit.shape[-1]
  id_bits = max(1, (m - 1).bit_length())
  id_mask = (1 << id_bits) - 1
  bits = jax.lax.bitcast_convert_type(jnp.clip(crit, 0.0, 1.0).astype(jnp.float32), jnp.int32)  # <= 0x3F800000
  one = 0x3F800000
  rank = jnp.where(forced, 0, jnp.where(valid, one + (1 << id_bits) - bits, 2 * one))  # ascending = visit order
  key = (rank & ~id_mask) | jnp.arange(m, dtype=jnp.int32)
  return jax.lax.sort(key, dimension=key.ndim - 1) & id_mask


class VisitPlan(NamedTuple):
  """Which blocks a sequence's KV group visits, and in what order.

  order: [B, H, M] logical block ids; forced (sink/local) blocks first, then descending criticality, then the
    blocks past the sequence end.
  limit: [B] at most this many blocks of `order` are visited.
  n_forced: [B] the loop never stops before visiting this many blocks.
  log_remaining: [B, H, Gp, M] log of the estimated mass (sum over blocks of n_tokens * exp(score)) of the
    blocks from position i of `order` on; -inf for padded heads.
  """

  order: jax.Array
  limit: jax.Array
  n_forced: jax.Array
  log_remaining: jax.Array


def _reverse_cumsum(x: jax.Array) -> jax.Array:
  """sum over j >= i of x_j along the last axis, for non-negative x.

  Two small triangular matmuls over blocks of ~sqrt(M) entries: the sums within each block, then the totals of
  the blocks after it. lax.cumsum lowers to a reduce-window that XLA:CPU runs in time quadratic in the row, and an
  associative scan is ~30 small ops; this is four (0.07 against 0.12-0.17 ms for [8, 1, 3, 512] on the
  development VM). Every sum adds non-negative terms, never subtracts, so a small tail keeps its relative
  precision.
  """
  m = x.shape[-1]
  b = max(8, 1 << math.ceil(math.log2(max(1.0, math.sqrt(m)))))
  n = -(-m // b)
  blocks = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n * b - m)]).reshape(*x.shape[:-1], n, b)
  upper = lambda size, k: jnp.triu(jnp.ones((size, size), x.dtype), k)  # [i, j] = 1 where j >= i + k
  within = jnp.einsum("...j,ij->...i", blocks, upper(b, 0), precision=jax.lax.Precision.HIGHEST)
  after = jnp.einsum("...j,ij->...i", within[..., 0], upper(n, 1), precision=jax.lax.Precision.HIGHEST)
  return (within + after[..., None]).reshape(*x.shape[:-1], n * b)[..., :m]


def _reverse_cumlogsumexp(x: jax.Array) -> jax.Array:
  """log(sum over j >= i of exp(x_j)) along the last axis; -inf where every term is -inf.

  One exp, a reverse prefix sum and a log, shifted by the row's max: lax.cumlogsumexp took ~30x longer on XLA:CPU
  (7 ms for [8, 3, 3, 512], a third of a PSA decode attention at 8K, batch 8). Terms more than ~87 nats below
  the row's max underflow to 0, far below anything the stopping rule compares.
  """
  top = jnp.max(x, axis=-1, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  return jnp.log(_reverse_cumsum(jnp.exp(x - top))) + top


def plan_visits(
    scores: jax.Array,  # [B, H, Gp, M]
    lengths: jax.Array,  # [B]
    *,
    group: int,
    block_size: int,
    sink_blocks: int,
    local_blocks: int,
    budget: jax.Array | int | None,
    budget_counts_forced: bool,
    min_blocks: int = 0,
) -> VisitPlan:
  """Orders blocks by criticality and sets the budget.

  The criticality of a block is the largest share of estimated attention mass it holds for any query head of
  the group: a block that matters to one head matters to the KV group. `budget` caps the blocks visited: on
  top of the forced ones when `budget_counts_forced` is False (top-k's k), in total otherwise (PSA's
  max_blocks); None means no cap. `min_blocks`: the stopping rule may not fire before this many of the most
  critical blocks (beyond the forced ones) have been visited (PSA's floor).
  """
  _, _, gp, m = scores.shape
  n = num_blocks(lengths, block_size)  # [B]
  j = jnp.arange(m)
  ntok = jnp.clip(lengths[:, None] - j[None, :] * block_size, 0, block_size)  # [B, M]
  valid = j[None, :] < n[:, None]  # [B, M]
  head_ok = (jnp.arange(gp) < group)[None, None, :, None]
  log_mass = jnp.where(
      valid[:, None, None, :] & head_ok,
      scores + jnp.log(jnp.maximum(ntok, 1).astype(jnp.float32))[:, None, None, :],
      NEG_INF,
  )  # [B, H, Gp, M]
  lse = jax.nn.logsumexp(log_mass, axis=-1, keepdims=True)
  # Empty sequences and padded heads have lse = -inf; their shares are 0, not NaN.
  share = jnp.exp(log_mass - jnp.where(jnp.isfinite(lse), lse, 0.0))
  crit = jnp.max(share, axis=2)  # [B, H, M]
  forced = valid & ((j[None, :] < sink_blocks) | (j[None, :] >= n[:, None] - local_blocks))  # [B, M]
  order = _descending_order(crit, forced[:, None, :], valid[:, None, :])
  n_forced = jnp.sum(forced, axis=-1).astype(jnp.int32)
  if budget is None:
    limit = n
  elif budget_counts_forced:
    limit = jnp.minimum(n, budget)
  else:
    limit = jnp.minimum(n, n_forced + budget)
  ordered = jnp.take_along_axis(log_mass, jnp.broadcast_to(order[:, :, None, :], log_mass.shape), axis=-1)
  log_remaining = _reverse_cumlogsumexp(ordered)
  n_forced = jnp.minimum(limit, n_forced + min_blocks).astype(jnp.int32)
  return VisitPlan(order, limit.astype(jnp.int32), n_forced, log_remaining)
