"""Plain-jnp oracles for the three decode attentions. No loop, no online softmax: every logit is computed,
then the blocks the progressive loop would visit are found from cumulative masses. Slow and obviously right;
the kernels and the XLA path are tested against these.

Shapes: q [B, H, G, D] (query heads grouped by KV head), pages [H, P, S, D], block_table [B, M], lengths [B].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from psa_jax.pallas_kernels import stopping
from psa_jax.pallas_kernels.selection import VisitPlan, num_blocks
from psa_jax.pallas_kernels.storage import unpack
from psa_jax.pallas_kernels.summaries import BlockSummaries

HIGHEST = jax.lax.Precision.HIGHEST


def _all_logits(q, k_pages, block_table, lengths, sm_scale):
  """Logits of every token slot of every block: [B, H, G, M, S] float32 and the token mask [B, M, S]."""
  s = k_pages.shape[2]
  m = block_table.shape[1]
  block_ok = jnp.arange(m)[None, :] < num_blocks(lengths, s)[:, None]
  pages = jnp.where(block_ok, block_table, 0)
  k = jnp.moveaxis(unpack(k_pages[:, pages]), 0, 1).astype(jnp.float32)  # [B, H, M, S, D]
  logits = jnp.einsum("bhgd,bhmsd->bhgms", q.astype(jnp.float32), k, precision=HIGHEST) * sm_scale
  token = jnp.arange(m)[:, None] * s + jnp.arange(s)[None, :]
  token_ok = token[None] < lengths[:, None, None]
  return logits, token_ok, pages


def _weighted_values(weights, v_pages, pages):
  """sum_t w_t v_t / sum_t w_t over the selected tokens; zero where nothing was selected."""
  v = jnp.moveaxis(unpack(v_pages[:, pages]), 0, 1).astype(jnp.float32)  # [B, H, M, S, D]
  num = jnp.einsum("bhgms,bhmsd->bhgd", weights, v, precision=HIGHEST)
  den = jnp.sum(weights, axis=(-2, -1))[..., None]
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def dense_reference(q, k_pages, v_pages, block_table, lengths, *, sm_scale):
  """softmax(q k^T) v over every token of the sequence: [B, H, G, D] float32."""
  logits, token_ok, pages = _all_logits(q, k_pages, block_table, lengths, sm_scale)
  logits = jnp.where(token_ok[:, None, None], logits, -jnp.inf)
  gmax = jnp.max(logits, axis=(-2, -1), keepdims=True)
  weights = jnp.where(token_ok[:, None, None], jnp.exp(logits - jnp.where(jnp.isfinite(gmax), gmax, 0.0)), 0.0)
  return _weighted_values(weights, v_pages, pages)


def ordered_attention_reference(
    q, k_pages, v_pages, block_table, lengths, plan: VisitPlan, tau, *, chunk_blocks, sm_scale, estimator,
    summaries: BlockSummaries | None = None, patience: int = 1, compensate: bool = False, tail: str = "last_chunk",
):
  """Attention over the blocks the progressive loop visits under `plan`: ([B, H, G, D], blocks used [B, H]).

  estimator None: exactly plan.limit blocks (top-k). Otherwise PSA's stopping rule (stopping.py), checked after
  every chunk of `chunk_blocks` blocks, in the same order the loop takes them. `summaries` (their vmean) are
  needed by the "value" estimator and by `compensate`.
  """
  logits, token_ok, pages = _all_logits(q, k_pages, block_table, lengths, sm_scale)
  v = jnp.moveaxis(unpack(v_pages[:, pages]), 0, 1).astype(jnp.float32)  # [B, H, M, S, D]
  vmean = None
  if summaries is not None:
    vmean = jnp.moveaxis(unpack(summaries.vmean[:, pages]), 0, 1).astype(jnp.float32)  # [B, H, M, D]
  return attend_in_order(logits, token_ok, v, vmean, lengths, plan, tau, chunk_blocks=chunk_blocks,
                         estimator=estimator, patience=patience, compensate=compensate, tail=tail)


def attend_in_order(logits, token_ok, v, vmean, lengths, plan: VisitPlan, tau, *, chunk_blocks, estimator,
                    patience=1, compensate=False, tail="last_chunk"):
  """The oracle's core, on logits already computed.

  logits: [B, H, G, M, S] scaled logits of every token slot; token_ok: [B, M, S]; v: [B or 1, H, M, S, D] values;
  vmean: [B or 1, H, M, D] the value summaries (None unless the rule or `compensate` needs them); lengths [B];
  tau [B, H] (each sequence and KV head's threshold). Returns (out [B, H, G, D] float32, blocks used [B, H] int32).

  Exposed so that a study can feed logits it computed against a shared, contiguous context (many queries over
  one document) without gathering pages per query.
  """
  b, h, g, m, s = logits.shape
  c = chunk_blocks
  # One context for every query (v [1, ...]) or one per query ([B, ...]).
  v_sub, v = ("hmsd", v[0]) if v.shape[0] == 1 and b != 1 else ("bhmsd", v)
  mask = token_ok[:, None, None]
  masked = jnp.where(mask, logits, -jnp.inf)
  gmax = jnp.max(masked, axis=(-2, -1))  # [B, H, G]
  safe_max = jnp.where(jnp.isfinite(gmax), gmax, 0.0)
  p = jnp.where(mask, jnp.exp(logits - safe_max[..., None, None]), 0.0)
  block_mass = jnp.sum(p, axis=-1)  # [B, H, G, M]
  ordered = jnp.take_along_axis(block_mass, jnp.broadcast_to(plan.order[:, :, None, :], block_mass.shape), -1)
  gathered_upto = jnp.concatenate([jnp.zeros((b, h, g, 1)), jnp.cumsum(ordered, axis=-1)], axis=-1)  # v -> mass
  n = num_blocks(lengths, s)
  n_chunks = -(-m // c)
  limit = plan.limit[:, None, None]  # [B, 1, 1]
  ends = jnp.minimum((jnp.arange(n_chunks) + 1) * c, limit)  # [B, 1, NC]
  starts = jnp.minimum(jnp.arange(n_chunks) * c, limit)
  ran = jnp.arange(n_chunks) * c < limit
  # x [B, H, G, K, ...] at positions idx [B, H, NC] of axis 3 -> [B, H, G, NC, ...]
  take = lambda x, idx: jnp.take_along_axis(
      x, jnp.broadcast_to(idx.reshape(b, h, 1, n_chunks, *([1] * (x.ndim - 4))),
                          (*x.shape[:3], n_chunks, *x.shape[4:])), 3)
  ends_bh = jnp.broadcast_to(ends, (b, h, n_chunks))
  gathered = take(gathered_upto, ends_bh)  # [B, H, G, NC]
  chunk_mass = gathered - take(gathered_upto, jnp.broadcast_to(starts, (b, h, n_chunks)))
  blocks_in_chunk = (ends - starts)[:, :, None, :]  # [B, 1, 1, NC]
  blocks_left = n[:, None, None, None] - ends[:, :, None, :]
  log_rem_at = None
  if stopping.needs_log_remaining(estimator, compensate, tail):
    # From position i of the order on, for i = 0..M (M: nothing left).
    log_rem = plan.log_remaining[..., :g, :]
    log_rem = jnp.concatenate([log_rem, jnp.full((*log_rem.shape[:-1], 1), -jnp.inf, log_rem.dtype)], axis=-1)
    log_rem_at = lambda idx: take(log_rem, jnp.broadcast_to(idx, (b, h, n_chunks)))  # [B, H, G, NC]
  unread = None
  if stopping.needs_values(estimator, compensate):
    tail_log_rem = {}
    if tail != "last_chunk":
      tail_log_rem = dict(log_rem_begin=log_rem_at(starts), log_rem_end=log_rem_at(ends))
    unread = stopping.unread_mass(tail, chunk_mass, blocks_in_chunk, blocks_left, tau=tau[:, :, None, None],
                                  **tail_log_rem)

  o_at = v_tail = None
  position = jnp.argsort(plan.order, axis=-1)  # block id -> its place in the visit order
  if stopping.needs_values(estimator, compensate):
    # Running output and the unread tokens' mean value after each chunk: sums over the blocks read by then, as
    # matmuls with a [block, chunk] "read by the end of chunk c" mask (a gather into visit order and a cumsum
    # over [B, H, G, M, D] cost ~4x more on a CPU).
    read_by = (position[..., None] < ends_bh[:, :, None, :]).astype(jnp.float32)  # [B, H, M, NC]
    pv = jnp.einsum(f"bhgms,{v_sub}->bhgmd", p, v, precision=HIGHEST)  # [B, H, G, M, D]
    pv_read = jnp.einsum("bhgmd,bhmc->bhgcd", pv, read_by, precision=HIGHEST)
    o_at = pv_read / jnp.where(gathered > 0, gathered, 1.0)[..., None]  # [B, H, G, NC, D]
    ntok = jnp.clip(lengths[:, None] - jnp.arange(m)[None, :] * s, 0, s).astype(jnp.float32)  # [B, M]
    vsum = vmean * ntok[:, None, :, None]  # [B, H, M, D]
    v_read = jnp.einsum("bhmd,bhmc->bhcd", vsum, read_by, precision=HIGHEST)
    n_read = jnp.einsum("bm,bhmc->bhc", ntok, read_by, precision=HIGHEST)
    v_tail = stopping.tail_value(jnp.sum(vsum, axis=2)[:, :, None], jnp.sum(ntok, axis=1)[:, None, None], v_read,
                                 n_read)[:, :, None]  # [B, H, 1, NC, D]

  if estimator is None:
    used = jnp.broadcast_to(plan.limit[:, None], (b, h))
  else:
    tau_ = tau[:, :, None, None]
    kwargs = {}
    if estimator in ("score_mass", "estimate"):
      kwargs = dict(log_rem=log_rem_at(jnp.minimum(ends, m - 1)), log_rem_first=log_rem[..., :1],
                    log_gathered=jnp.log(gathered) + gmax[..., None])
    elif estimator == "value":
      kwargs = dict(change=stopping.relative_change(gathered, unread, o_at, v_tail))
    enough = stopping.enough(estimator, tau_, gathered=gathered, chunk_mass=chunk_mass,
                             blocks_in_chunk=blocks_in_chunk, blocks_left=blocks_left, **kwargs)
    ok = (tau[:, :, None] < 1.0) & (ends >= plan.n_forced[:, None, None]) & jnp.all(enough, axis=2)
    streak = ok
    for lag in range(1, patience):  # the rule held at `patience` consecutive chunk boundaries
      streak = streak & jnp.pad(ok, ((0, 0), (0, 0), (lag, 0)))[..., :n_chunks]
    stop = ((ends >= limit) | streak) & ran
    first = jnp.argmax(stop, axis=-1)  # [B, H]
    used = jnp.where(jnp.any(stop, axis=-1), jnp.take_along_axis(ends_bh, first[..., None], -1)[..., 0], 0)

  visit = position < used[..., None]  # [B, H, M]
  weights = jnp.where(visit[:, :, None, :, None], p, 0.0)
  num = jnp.einsum(f"bhgms,{v_sub}->bhgd", weights, v, precision=HIGHEST)
  den = jnp.sum(weights, axis=(-2, -1))[..., None]
  out = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
  if compensate:
    # The chunk the loop stopped after: its tail estimate (0 once every block is read, so tau = 1 stays exact).
    last = jnp.clip((used + c - 1) // c - 1, 0, n_chunks - 1)[:, :, None, None]  # [B, H, 1, 1]
    pick = lambda x: jnp.take_along_axis(x, jnp.broadcast_to(last, (*x.shape[:3], 1)), 3)[..., 0]
    tail_last = jnp.where((used > 0)[:, :, None], pick(jnp.broadcast_to(unread, gathered.shape)), 0.0)
    v_last = jnp.take_along_axis(v_tail, jnp.broadcast_to(last[..., None], (b, h, 1, 1, v_tail.shape[-1])), 3)
    v_last = v_last[:, :, :, 0]
    out = jnp.where(den > 0, stopping.compensate(out, den[..., 0], tail_last, v_last), out)
  return out, used.astype(jnp.int32)
