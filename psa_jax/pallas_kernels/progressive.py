"""Progressive decode attention over a paged KV cache: one loop for dense, top-k and PSA.

A program owns one (sequence, KV head). It walks the sequence's blocks in a given order, `chunk_blocks` per
iteration, folds each chunk into an online softmax, and stops on its own:
  * after `limit` blocks (dense: all blocks; top-k: forced + k; PSA: max_blocks), or
  * (PSA only) once PSA's stopping rule has held for every query head of the group at `patience` consecutive
    chunk boundaries, the forced sink/local blocks being in.
With `compensate`, PSA folds the estimated contribution of the blocks it did not read into the output.
The rule itself (estimators, tail estimates, compensation) is defined once, in `stopping.py`; the loops here
only gather its inputs after each chunk, in their own layout, and call it.
Two implementations of that loop: `progressive_loop`, the Pallas kernel's body (one chunk per iteration, reading
refs through small "loader" callables), and `_wide_loop`, the XLA path's (one loop per KV head, vmapped over the
batch, several chunks per iteration because a CPU loop iteration is expensive, replaying the stopping rule at each
chunk boundary).
Both must take the same decisions as the loop-free oracle in `reference.py`, which calls `stopping.py` too; the
tests hold each loop against it.

The value-aware parts ("value" estimator, `compensate`) also need, per KV head, the value summaries (vmean) of the
blocks read so far and of the whole sequence, both weighted by each block's token count. The whole sequence's sum
is computed once before the loop. The XLA loop adds up the vmean rows of the pages it visits (C rows of D per
chunk beside the [C, S, D] of KV); the Pallas loop reads the sum of the blocks read by the end of each chunk from
`value_prefix`, computed before the loop in visit order, one [1, D] row per chunk. Without them
(`stopping.needs_values` False) the loops carry and read nothing extra.

The Pallas loop is shaped around the Triton compiler's layout pass (RemoveLayoutConversions), which otherwise
segfaults or mis-types the value bookkeeping, nondeterministically, for every num_warps, num_stages and
architecture tried (the GPU compile check, `gpu_compile.py`, holds every configuration to this):
  * it carries no sum of value rows: any vmean row it gathers and accumulates across chunks crashed the pass at
    head_dim 128, and a [C, D] gather by the page indices of the [C, S, D] KV gather crashed it at any head_dim;
  * every tensor it carries is read inside the loop by something other than its own update: with `compensate`
    it carries the compensated output of the chunk it stopped after, kept by a select on the loop's own stop;
  * the stop goes through the patience streak's counter at every patience, 1 included.

Shapes: B batch, H kv heads, Gp query heads per kv head padded, D head_dim, P pages, S block size,
M blocks per sequence (padded to a multiple of chunk_blocks).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from psa_jax.pallas_kernels import stopping
from psa_jax.pallas_kernels.storage import unpack, value_dtype

# Finite stand-in for -inf: keeps exp(m_old - m_new) finite when a running max has seen no token yet.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# Fields of the per-sequence int info vector.
LENGTH, LIMIT, N_FORCED = 0, 1, 2
INFO_WIDTH = 4  # power of two for the Triton lowering


def _dot_t(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b.T accumulated in float32 (exact float32 products when the inputs are float32)."""
  precision = lax.Precision.HIGHEST if b.dtype == jnp.float32 else None
  return jnp.dot(a.astype(b.dtype), b.T, preferred_element_type=jnp.float32, precision=precision)


def _block_tokens(logical: jax.Array, length: jax.Array, block_size: int) -> jax.Array:
  """Tokens held by each logical block (float32, 0 past the end): the weight of its vmean in the value sums."""
  return jnp.clip(length - logical * block_size, 0, block_size).astype(jnp.float32)


def _weighted_rows(ntok: jax.Array, vmean: jax.Array) -> jax.Array:
  """ntok[:, None] * vmean as float32 [n, D], exactly 0 for empty slots whatever the page they point at holds."""
  return jnp.where(ntok[:, None] > 0, ntok[:, None] * vmean.astype(jnp.float32), 0.0)


def _vmean_rows(vmean: jax.Array, pages: jax.Array, head: int) -> jax.Array:
  """vmean rows [n, D] float32 of `pages` at the static `head` of the pool [H, P, D] (a gather, never a slice)."""
  n_pages, d = vmean.shape[1:]
  return unpack(vmean.reshape(-1, d)[head * n_pages + pages]).astype(jnp.float32)


def value_totals(vmean: jax.Array, block_table: jax.Array, lengths: jax.Array, *, heads, block_size: int
                 ) -> jax.Array:
  """Sum over each sequence's blocks of n_tokens * vmean, per KV head: float32 [B, len(heads), D].

  vmean: the pool's value summaries [H, P, D]; block_table: [B, M]; lengths: [B]; heads: the pool's KV heads to
  read. With the token count (which is the length), it gives the mean value of the unread tokens once the read
  blocks are subtracted (stopping.tail_value).

  The rows are gathered for all sequences at once and kept apart from the sum (the barrier): fused into the
  weighting, XLA:CPU gathered element by element, ~2x slower (0.86 vs 0.5 ms for 8 sequences of 8K, 3 heads).
  """
  n_pages, d = vmean.shape[1:]
  ntok = _block_tokens(jnp.arange(block_table.shape[1])[None, :], lengths[:, None], block_size)  # [B, M]
  pages = jnp.where(ntok > 0, block_table, 0)
  rows = jnp.asarray(heads, jnp.int32)[None, :, None] * n_pages + pages[:, None, :]  # [B, h, M]
  gathered = lax.optimization_barrier(vmean.reshape(-1, d)[rows])
  # Empty slots weigh 0 whatever their page holds; a 0 weight would still turn an inf or nan row into nan.
  weighted = jnp.where((ntok > 0)[:, None, :, None], unpack(gathered).astype(jnp.float32), 0.0)
  return jnp.einsum("bm,bhmd->bhd", ntok, weighted, precision=lax.Precision.HIGHEST)


def value_prefix(vmean: jax.Array, block_table: jax.Array, order: jax.Array, lengths: jax.Array, limit: jax.Array,
                 *, block_size: int, chunk_blocks: int) -> jax.Array:
  """Sum of n_tokens * vmean over the blocks a loop has read by the end of each chunk: float32 [B, H, M / C, D].

  vmean: [H, P, D]; block_table: [B, M]; order: [B, H, M] (the visit order); lengths, limit: [B]. Row i holds the
  blocks at positions below min((i + 1) * C, limit) of `order`, the blocks the loop has visited after chunk i.
  One gather of every block's row, in visit order, then a sum per chunk and a prefix sum over chunks. It reads
  every block's vmean row, as `value_totals` does, and writes M / C rows of D float32 per (sequence, KV head):
  1/(S * C) of the bytes of the sequence's bfloat16 K and V (1/64 at 16-token blocks and 4-block chunks).
  """
  b, h, m = order.shape
  n_pages = vmean.shape[1]
  ntok = _block_tokens(jnp.arange(m)[None, :], lengths[:, None], block_size)  # [B, M] by logical block
  weight = jnp.take_along_axis(jnp.broadcast_to(ntok[:, None], order.shape), order, axis=-1)  # [B, H, M] by position
  weight = jnp.where(jnp.arange(m) < limit[:, None, None], weight, 0.0)
  pages = jnp.take_along_axis(jnp.broadcast_to(block_table[:, None], order.shape), order, axis=-1)
  rows = jnp.arange(h)[None, :, None] * n_pages + jnp.where(weight > 0, pages, 0)
  gathered = unpack(vmean.reshape(n_pages * h, -1)[rows]).astype(jnp.float32)  # [B, H, M, D]
  weighted = jnp.where(weight[..., None] > 0, weight[..., None] * gathered, 0.0)
  per_chunk = weighted.reshape(b, h, m // chunk_blocks, chunk_blocks, -1).sum(axis=3)
  return jnp.cumsum(per_chunk, axis=2)


def _normalize(o, l, extra, v_total, n_total, compensate):
  """The loop's unnormalized output [Gp, D] over its mass l [Gp], with the unread tail folded in if `compensate`
  (the tail estimate of the chunk the loop stopped after; 0 once every block is read, so tau = 1 stays exact)."""
  o = jnp.where(l[:, None] > 0, o / jnp.where(l > 0, l, 1.0)[:, None], 0.0)
  if compensate:
    v_tail = stopping.tail_value(v_total, n_total, extra["v_read"], extra["n_read"])
    o = jnp.where(l[:, None] > 0, stopping.compensate(o, l, extra["tail"], v_tail), o)
  return o


def progressive_loop(
    q: jax.Array,  # [Gp, D]
    length: jax.Array,  # [] tokens in the sequence
    limit: jax.Array,  # [] most blocks to visit
    n_forced: jax.Array,  # [] blocks visited before the stopping rule may fire
    tau: jax.Array,  # [] float32
    *,
    load_order: Callable[[jax.Array], jax.Array],  # start -> [C] logical block ids
    load_pages: Callable[[jax.Array], jax.Array],  # [C] logical -> [C] physical pages
    load_kv: Callable[[jax.Array], tuple[jax.Array, jax.Array]],  # [C] pages -> 2 x [C, S, D]
    load_log_remaining: Callable[[jax.Array], jax.Array] | None,  # i -> [Gp]
    load_value_prefix: Callable[[jax.Array], jax.Array] | None,  # chunk i -> [1, D] (value_prefix); when needs_values
    v_total: jax.Array | None,  # [1, D] float32, `value_totals` of the sequence and head; when stopping.needs_values
    group: int,
    block_size: int,
    chunk_blocks: int,
    num_order_slots: int,
    sm_scale: float,
    estimator: str | None,  # None: no early stop (dense, top-k)
    patience: int = 1,  # chunk boundaries in a row at which the rule must hold (PSAConfig.patience)
    compensate: bool = False,  # fold the unread blocks' estimate into the output (PSAConfig.compensate)
    tail: str = "last_chunk",  # the unread-mass estimate of "value" and compensation (PSAConfig.tail)
) -> tuple[jax.Array, jax.Array]:
  """Returns the normalized output [Gp, D] (float32) and the number of blocks visited []."""
  gp, d = q.shape
  c, s = chunk_blocks, block_size
  head_ok = jnp.arange(gp) < group
  n_valid = (length + s - 1) // s
  values = stopping.needs_values(estimator, compensate)
  # The rule's streak is counted even at patience 1, where it changes nothing: without that carry the Triton
  # compiler crashed on every compensated configuration (see the module docstring).
  streaks = estimator is not None
  if values:
    n_total = length.astype(jnp.float32)  # the token counts of the sequence's blocks add up to its length

  def body(carry):
    i, o, m, l, _, _, extra = carry
    start = i * c
    in_budget = start + jnp.arange(c) < limit
    logical = jnp.where(in_budget, load_order(start), 0)
    pages = jnp.where(in_budget, load_pages(logical), 0)
    k, v = load_kv(pages)
    k = k.reshape(c * s, d)
    v = v.reshape(c * s, d)
    token = logical[:, None] * s + jnp.arange(s)[None, :]
    token_ok = (in_budget[:, None] & (token < length)).reshape(1, c * s)

    logits = jnp.where(token_ok, _dot_t(q, k) * sm_scale, MASK_VALUE)  # [Gp, C*S]
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
    correction = jnp.exp(m - m_new)
    p = jnp.where(token_ok, jnp.exp(logits - m_new[:, None]), 0.0)
    chunk_mass = jnp.sum(p, axis=-1)
    l_new = l * correction + chunk_mass
    precision = lax.Precision.HIGHEST if v.dtype == jnp.float32 else None
    o_new = o * correction[:, None] + jnp.dot(
        p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=precision)

    visited = jnp.minimum(start + c, limit)
    done = visited >= limit
    blocks_in_chunk, blocks_left = visited - start, n_valid - visited
    extra_new = {}
    if values:
      ntok = jnp.where(in_budget, _block_tokens(logical, length, s), 0.0)  # [C]
      v_read = load_value_prefix(i)  # [1, D]
      extra_new["n_read"] = extra["n_read"] + jnp.sum(ntok)
      tail_log_rem = {}
      if tail != "last_chunk":
        tail_log_rem = dict(log_rem_begin=load_log_remaining(jnp.minimum(start, num_order_slots - 1)),
                            log_rem_end=load_log_remaining(jnp.minimum(visited, num_order_slots - 1)))
      unread = stopping.unread_mass(tail, chunk_mass, blocks_in_chunk, blocks_left, tau=tau, **tail_log_rem)  # [Gp]
    if compensate:  # the output if the loop stops here (see the module docstring)
      out = _normalize(o_new, l_new, dict(extra_new, v_read=v_read, tail=unread), v_total, n_total, compensate)
    if estimator is not None:
      if estimator == "score_mass":
        log_rem = load_log_remaining(jnp.minimum(visited, num_order_slots - 1))
        rule_inputs = dict(log_rem=log_rem, log_gathered=jnp.log(l_new) + m_new)  # l * exp(m): absolute mass
      elif estimator == "estimate":
        log_rem = load_log_remaining(jnp.minimum(visited, num_order_slots - 1))
        rule_inputs = dict(log_rem=log_rem, log_rem_first=load_log_remaining(0))
      elif estimator == "value":
        o_now = o_new / jnp.where(l_new > 0, l_new, 1.0)[:, None]
        v_tail = stopping.tail_value(v_total, n_total, v_read, extra_new["n_read"])
        rule_inputs = dict(change=stopping.relative_change(l_new, unread, o_now, v_tail))
      else:
        rule_inputs = {}
      enough = stopping.enough(estimator, tau, gathered=l_new, chunk_mass=chunk_mass,
                               blocks_in_chunk=blocks_in_chunk, blocks_left=blocks_left, **rule_inputs)
      all_enough = jnp.min(jnp.where(enough | ~head_ok, 1, 0)) > 0
      ok = (tau < 1.0) & (visited >= n_forced) & all_enough
      if streaks:
        extra_new["streak"] = jnp.where(ok, extra["streak"] + 1, 0)
        ok = extra_new["streak"] >= patience
      done = done | ok
    if compensate:
      extra_new["out"] = jnp.where(done, out, extra["out"])
    return i + 1, o_new, m_new, l_new, visited, done, extra_new

  extra = {}
  if values:
    extra["n_read"] = jnp.float32(0)
  if compensate:
    extra["out"] = jnp.zeros((gp, d), jnp.float32)  # what an empty sequence returns
  if streaks:
    extra["streak"] = jnp.int32(0)
  init = (
      jnp.int32(0),
      jnp.zeros((gp, d), jnp.float32),
      jnp.full((gp,), MASK_VALUE, jnp.float32),
      jnp.zeros((gp,), jnp.float32),
      jnp.int32(0),
      limit <= 0,
      extra,
  )
  _, o, _, l, visited, _, extra = lax.while_loop(lambda carry: jnp.logical_not(carry[5]), body, init)
  if compensate:
    return extra["out"], visited
  return _normalize(o, l, extra, None, None, compensate), visited


def _kernel(q_ref, k_ref, v_ref, table_ref, order_ref, log_rem_ref, v_prefix_ref, v_total_ref, info_ref, tau_ref,
            o_ref, used_ref, **loop_kwargs):
  c = loop_kwargs["chunk_blocks"]
  if order_ref is None:  # dense: natural order, no gather of the order
    load_order = lambda start: start + jnp.arange(c)
  else:
    load_order = lambda start: order_ref[pl.ds(start, c)]
  load_log_remaining = None
  if log_rem_ref is not None:
    # [Gp, 1] -> [Gp] by a reduction: the Triton lowering has no general reshape.
    load_log_remaining = lambda i: jnp.max(log_rem_ref[:, pl.ds(i, 1)], axis=-1)
  o, visited = progressive_loop(
      q_ref[...],
      info_ref[LENGTH],
      info_ref[LIMIT],
      info_ref[N_FORCED],
      tau_ref[0],
      load_order=load_order,
      load_pages=lambda logical: table_ref[logical],
      load_kv=lambda pages: (k_ref[pages], v_ref[pages]),
      load_log_remaining=load_log_remaining,
      load_value_prefix=None if v_prefix_ref is None else (lambda i: v_prefix_ref[pl.ds(i, 1), :]),
      v_total=None if v_total_ref is None else v_total_ref[...],
      **loop_kwargs,
  )
  o_ref[...] = o.astype(o_ref.dtype)
  used_ref[...] = jnp.full(used_ref.shape, visited, jnp.int32)


def progressive_attention_pallas(
    q: jax.Array,  # [B, H, Gp, D]
    k_pages: jax.Array,  # [H, P, S, D]
    v_pages: jax.Array,  # [H, P, S, D]
    block_table: jax.Array,  # [B, M]
    order: jax.Array | None,  # [B, H, M]; None: natural order
    log_remaining: jax.Array | None,  # [B, H, Gp, M]; when stopping.needs_log_remaining
    info: jax.Array,  # [B, INFO_WIDTH] int32: length, limit, n_forced
    tau: jax.Array,  # [B, H] float32: each (sequence, KV head)'s threshold
    *,
    group: int,
    chunk_blocks: int,
    sm_scale: float,
    estimator: str | None,
    interpret: bool,
    vmean: jax.Array | None = None,  # [H, P, D] value summaries; needed when stopping.needs_values
    patience: int = 1,
    compensate: bool = False,
    tail: str = "last_chunk",
    num_warps: int = 4,
    num_stages: int = 2,
) -> tuple[jax.Array, jax.Array]:
  """Pallas (Triton) launch: grid over (sequence, KV head). Returns out [B, H, Gp, D], blocks used [B, H]."""
  b, h, gp, d = q.shape
  _, p, s, _ = k_pages.shape
  m = block_table.shape[1]
  v_total = v_prefix = None
  if stopping.needs_values(estimator, compensate):
    if vmean is None:
      raise ValueError(f"estimator {estimator!r} with compensate={compensate} needs the value summaries (vmean)")
    v_total = value_totals(vmean, block_table, info[:, LENGTH], heads=range(h), block_size=s)[:, :, None, :]
    v_prefix = value_prefix(vmean, block_table, order, info[:, LENGTH], info[:, LIMIT], block_size=s,
                            chunk_blocks=chunk_blocks)
  kernel = functools.partial(
      _kernel, group=group, block_size=s, chunk_blocks=chunk_blocks, num_order_slots=m,
      sm_scale=sm_scale, estimator=estimator, patience=patience, compensate=compensate, tail=tail)
  pages_spec = pl.BlockSpec((None, p, s, d), lambda i, j: (j, 0, 0, 0))
  in_specs = [
      pl.BlockSpec((None, None, gp, d), lambda i, j: (i, j, 0, 0)),
      pages_spec,
      pages_spec,
      pl.BlockSpec((None, m), lambda i, j: (i, 0)),
      None if order is None else pl.BlockSpec((None, None, m), lambda i, j: (i, j, 0)),
      None if log_remaining is None else pl.BlockSpec((None, None, gp, m), lambda i, j: (i, j, 0, 0)),
      None if v_prefix is None else pl.BlockSpec((None, None, m // chunk_blocks, d), lambda i, j: (i, j, 0, 0)),
      None if v_total is None else pl.BlockSpec((None, None, 1, d), lambda i, j: (i, j, 0, 0)),
      pl.BlockSpec((None, INFO_WIDTH), lambda i, j: (i, 0)),
      pl.BlockSpec((None, None, 1), lambda i, j: (i, j, 0)),
  ]
  out, used = pl.pallas_call(
      kernel,
      grid=(b, h),
      in_specs=in_specs,
      out_specs=[
          pl.BlockSpec((None, None, gp, d), lambda i, j: (i, j, 0, 0)),
          pl.BlockSpec((None, None, gp), lambda i, j: (i, j, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((b, h, gp, d), q.dtype),
          jax.ShapeDtypeStruct((b, h, gp), jnp.int32),
      ],
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=f"progressive_attention_{estimator or 'fixed'}",
  )(q, k_pages, v_pages, block_table, order, log_remaining, v_prefix, v_total, info, tau[..., None])
  return out, used[..., 0]


def _wide_loop(q, length, limit, n_forced, tau, order, table, k_pages, v_pages, log_rem, vmean, v_total, *, head,
               group, block_size, chunk_blocks, chunks_per_step, sm_scale, estimator, patience=1, compensate=False,
               tail="last_chunk"):
  """`progressive_loop` for the XLA path, `chunks_per_step` chunks per iteration.

  On a CPU each loop iteration has a fixed cost that dwarfs a 4-block chunk's arithmetic, so one iteration
  computes several chunks at once and then replays the stopping rule at each chunk boundary inside it, keeping
  only the chunks up to the first boundary where the rule fires. The blocks counted as visited, and so the
  output, are those of the one-chunk loop; the extra chunks are computed and dropped. What the one-chunk loop
  carries from chunk to chunk (the patience streak, the value sums) is replayed the same way, with cumulative sums
  over the iteration's chunks, and carried across iterations.
  Arrays are one (sequence, KV head): order [M], table [M], log_rem [Gp, M]; the pages are the whole pool
  [H, P, S, D] and vmean the pool's value summaries [H, P, D] (None unless `stopping.needs_values`), read at the
  static `head` (a gather, never a slice that XLA could copy); v_total [D]: the sequence's `value_totals` at that
  head (None unless `stopping.needs_values`).
  """
  gp, d = q.shape
  c, s, g = chunk_blocks, block_size, chunks_per_step
  m_slots = order.shape[0]
  head_ok = jnp.arange(gp) < group
  n_valid = (length + s - 1) // s
  sub = jnp.arange(g)
  values = stopping.needs_values(estimator, compensate)
  streaks = estimator is not None and patience > 1
  # The running output after every chunk of an iteration, not only after the kept ones: the "value" rule reads it.
  outputs_per_chunk = estimator == "value"
  if values:
    n_total = length.astype(jnp.float32)  # the token counts of the sequence's blocks add up to its length

  # Pages viewed as rows of S*D values: XLA:CPU copies a gathered 1-D row much faster than an [S, D] tile
  # (32 vs 53 us for 32 pages of 16 x 64 float32 on the development VM). The pool is flattened to [H * P] rows so
  # the gather takes one index per row (a [head, page] index pair cost an extra op every iteration).
  # A packed pool (bfloat16 bits, storage.py) is widened row by row after the gather.
  n_pages = k_pages.shape[1]
  rows = lambda pages_all, pages: unpack(
      pages_all.reshape(-1, s * d)[head * n_pages + pages]).reshape(g * c * s, d)
  # q as the matmul's right operand, transposed once here rather than in every iteration.
  q_t = q.astype(value_dtype(k_pages.dtype)).T

  def body(carry):
    i, o, m, l, _, finished, extra = carry
    start = i * c * g
    position = start + jnp.arange(g * c)
    # `finished` is always False here for one lane; vmapped over a batch, the loop runs until every lane is done
    # and a finished lane's results are thrown away, so it reads page 0 (cached) instead of its next pages.
    in_budget = (position < limit) & ~finished
    logical = jnp.where(in_budget, order[jnp.minimum(position, m_slots - 1)], 0)
    pages = jnp.where(in_budget, table[logical], 0)
    k = rows(k_pages, pages)
    v = rows(v_pages, pages)
    token = logical[:, None] * s + jnp.arange(s)[None, :]
    token_ok = (in_budget[:, None] & (token < length)).reshape(g * c * s, 1)
    # Token-major logits [g*C*S, Gp]: the gathered keys enter the matmul as its left operand in their natural
    # layout. Written as q @ k.T, XLA:CPU materialized a transposed copy of every gathered chunk, which took ~2/3 of
    # the loop's time (profiled on the development VM).
    precision = lax.Precision.HIGHEST if k.dtype == jnp.float32 else None
    logits = jnp.dot(k, q_t, preferred_element_type=jnp.float32, precision=precision)
    logits = jnp.where(token_ok, logits * sm_scale, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(logits, axis=0))
    correction = jnp.exp(m - m_new)
    p = jnp.where(token_ok, jnp.exp(logits - m_new[None, :]), 0.0)  # [g*C*S, Gp]
    chunk_mass = p.reshape(g, c * s, gp).sum(1).T  # [Gp, g]
    gathered = l[:, None] * correction[:, None] + jnp.cumsum(chunk_mass, axis=-1)  # after each chunk
    ends = jnp.minimum(start + (sub + 1) * c, limit)  # [g] blocks visited after each chunk
    begins = jnp.minimum(start + sub * c, limit)
    blocks_in_chunk, blocks_left = ends - begins, n_valid - ends
    if values:  # the value sums and the tail estimate after each chunk
      ntok = jnp.where(in_budget, _block_tokens(logical, length, s), 0.0)  # [g*C]
      weighted = _weighted_rows(ntok, _vmean_rows(vmean, pages, head)).reshape(g, c, d).sum(1)
      v_read = extra["v_read"] + jnp.cumsum(weighted, axis=0)  # [g, D]
      n_read = extra["n_read"] + jnp.cumsum(ntok.reshape(g, c).sum(1))  # [g]
      tail_log_rem = {}
      if tail != "last_chunk":
        tail_log_rem = dict(log_rem_begin=log_rem[:, jnp.minimum(begins, m_slots - 1)],
                            log_rem_end=log_rem[:, jnp.minimum(ends, m_slots - 1)])
      unread = stopping.unread_mass(tail, chunk_mass, blocks_in_chunk, blocks_left, tau=tau,
                                    **tail_log_rem)  # [Gp, g]
    if outputs_per_chunk:
      # p @ v chunk by chunk, then summed up to each boundary: the unnormalized output after each chunk. From an
      # explicitly transposed p, as below: contracted over p's first axis, XLA:CPU's batched dot made a loop with
      # the "value" rule 30% slower than with "last_chunk" (8K tokens, float32, batch 1), against 5-10% this way.
      p_t = lax.optimization_barrier(p.astype(v.dtype).T).reshape(gp, g, c * s)
      pv = jnp.einsum("igt,gtd->gid", p_t, v.reshape(g, c * s, d), preferred_element_type=jnp.float32,
                      precision=precision)  # [g, Gp, D]
      o_upto = o[None] * correction[None, :, None] + jnp.cumsum(pv, axis=0)
    stop = ends >= limit
    if estimator is not None:
      if estimator == "score_mass":
        rule_inputs = dict(log_rem=log_rem[:, jnp.minimum(ends, m_slots - 1)],
                           log_gathered=jnp.log(gathered) + m_new[:, None])  # l * exp(m): absolute mass
      elif estimator == "estimate":
        rule_inputs = dict(log_rem=log_rem[:, jnp.minimum(ends, m_slots - 1)], log_rem_first=log_rem[:, :1])
      elif estimator == "value":
        o_at = jnp.swapaxes(o_upto, 0, 1) / jnp.where(gathered > 0, gathered, 1.0)[..., None]  # [Gp, g, D]
        v_tail = stopping.tail_value(v_total, n_total, v_read, n_read)  # [g, D]
        rule_inputs = dict(change=stopping.relative_change(gathered, unread, o_at, v_tail[None]))
      else:
        rule_inputs = {}
      enough = stopping.enough(estimator, tau, gathered=gathered, chunk_mass=chunk_mass,
                               blocks_in_chunk=blocks_in_chunk, blocks_left=blocks_left, **rule_inputs)
      all_enough = jnp.all(enough | ~head_ok[:, None], axis=0)
      ok = (tau < 1.0) & (ends >= n_forced) & all_enough  # [g]
      if streaks:
        # Boundaries in a row at which the rule held, up to each boundary, continuing the previous iteration's run.
        last_miss = lax.cummax(jnp.where(ok, -1, sub), axis=0)
        run = jnp.where(last_miss < 0, extra["streak"] + sub + 1, sub - last_miss)
        ok = run >= patience
      stop = stop | ok
    stop = stop & (begins < limit)  # chunks past the budget never ran
    done = jnp.any(stop)
    last = jnp.where(done, jnp.argmax(stop), g - 1)
    if outputs_per_chunk:
      o_new = o_upto[last]
    else:
      keep = (jnp.repeat(sub, c * s) <= last)[:, None]
      # p.T @ v as a plain [Gp, rows] x [rows, D] matmul of an explicitly transposed p (a few KiB). Written as a
      # contraction over p's first axis, XLA:CPU chose a slower dot; the barrier keeps it from folding the
      # transpose back in (PSA -6%, dense -8% per token at 8K, batch 1, in the e2e study).
      p_t = lax.optimization_barrier(jnp.where(keep, p, 0.0).astype(v.dtype).T)
      pv = jnp.dot(p_t, v, preferred_element_type=jnp.float32, precision=precision)  # [Gp, D]
      o_new = o * correction[:, None] + pv
    extra_new = {}
    if values:
      extra_new.update(v_read=v_read[last], n_read=n_read[last], tail=unread[:, last])
    if streaks:
      extra_new["streak"] = run[last]
    return i + 1, o_new, m_new, gathered[:, last], ends[last], done, extra_new

  extra = {}
  if values:
    extra.update(v_read=jnp.zeros((d,), jnp.float32), n_read=jnp.float32(0), tail=jnp.zeros((gp,), jnp.float32))
  if streaks:
    extra["streak"] = jnp.int32(0)
  init = (jnp.int32(0), jnp.zeros((gp, d), jnp.float32), jnp.full((gp,), MASK_VALUE, jnp.float32),
          jnp.zeros((gp,), jnp.float32), jnp.int32(0), limit <= 0, extra)
  _, o, _, l, visited, _, extra = lax.while_loop(lambda carry: jnp.logical_not(carry[5]), body, init)
  return _normalize(o, l, extra, v_total if values else None, n_total if values else None, compensate), visited


def progressive_attention_xla(
    q, k_pages, v_pages, block_table, order, log_remaining, info, tau, *, group, chunk_blocks, sm_scale,
    estimator, vmean=None, patience: int = 1, compensate: bool = False, tail: str = "last_chunk",
    chunks_per_step: int = 8,
    heads: tuple[int, ...] | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The same decisions as plain XLA ops: the CPU path. Same signature and results as
  `progressive_attention_pallas` (tau [B, H]); `chunks_per_step` chunks are computed per loop iteration. `heads`: the KV
  heads of the pool (and of vmean) that q's head axis stands for (None: all of them, in order).

  One loop per KV head, each vmapped over the batch, so each head stops on its own; one loop vmapped over heads
  as well ran every head until the slowest one was done, ~15% slower for PSA at 8K, batch 8, and a
  single loop stepping all heads side by side was slower still. The loops do not overlap in time:
  XLA's buffer assignment reuses one loop's temporaries for the next, so the CPU runtime orders them (seen in
  its dependency log). The unrolling is over the few KV heads of one device, never over tokens or
  layers.
  """
  b, h, gp, d = q.shape
  s = k_pages.shape[2]
  m = block_table.shape[1]
  if order is None:
    order = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), (b, h, m))
  if log_remaining is None:
    log_remaining = jnp.zeros((b, h, 1, 1), jnp.float32)  # unread placeholder, vmapped like the real one
  if stopping.needs_values(estimator, compensate) and vmean is None:
    raise ValueError(f"estimator {estimator!r} with compensate={compensate} needs the value summaries (vmean)")

  def one(q_b, table_b, order_b, log_rem_b, info_b, tau_b, v_total_b, *, head):
    return _wide_loop(q_b, info_b[LENGTH], info_b[LIMIT], info_b[N_FORCED], tau_b, order_b, table_b, k_pages,
                      v_pages, log_rem_b, vmean, v_total_b, head=head, group=group, block_size=s,
                      chunk_blocks=chunk_blocks, chunks_per_step=chunks_per_step, sm_scale=sm_scale,
                      estimator=estimator, patience=patience, compensate=compensate, tail=tail)

  heads = tuple(range(h)) if heads is None else heads
  if stopping.needs_values(estimator, compensate):
    v_total = value_totals(vmean, block_table, info[:, LENGTH], heads=heads, block_size=s)
  else:
    v_total = jnp.zeros((b, h, 1), jnp.float32)  # unread placeholder, vmapped like the real one
  outs, used = zip(*(
      jax.vmap(functools.partial(one, head=head))(q[:, i], block_table, order[:, i], log_remaining[:, i], info,
                                                  tau[:, i], v_total[:, i])
      for i, head in enumerate(heads)))
  return jnp.stack(outs, axis=1).astype(q.dtype), jnp.stack(used, axis=1)
