"""Plain-jnp oracles for the three decode attentions. No loop, no online softmax: every logit is computed,
then the blocks the progressive loop would visit are found from cumulative masses. Slow and obviously right;
the kernels and the XLA path are tested against these.

Shapes: q [B, H, G, D] (query heads grouped by KV head), pages [H, P, S, D], block_table [B, M], lengths [B].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.selection import VisitPlan, num_blocks
from pallas_kernels.storage import unpack

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
    q, k_pages, v_pages, block_table, lengths, plan: VisitPlan, tau, *, chunk_blocks, sm_scale, estimator
):
  """Attention over the blocks the progressive loop visits under `plan`: ([B, H, G, D], blocks used [B, H]).

  estimator None: exactly plan.limit blocks (top-k). Otherwise PSA's stopping rule, checked after every chunk
  of `chunk_blocks` blocks, in the same order the loop takes them.
  """
  s = k_pages.shape[2]
  b, h, g, _ = q.shape
  m = block_table.shape[1]
  c = chunk_blocks
  logits, token_ok, pages = _all_logits(q, k_pages, block_table, lengths, sm_scale)
  masked = jnp.where(token_ok[:, None, None], logits, -jnp.inf)
  gmax = jnp.max(masked, axis=(-2, -1))  # [B, H, G]
  safe_max = jnp.where(jnp.isfinite(gmax), gmax, 0.0)
  p = jnp.where(token_ok[:, None, None], jnp.exp(logits - safe_max[..., None, None]), 0.0)
  block_mass = jnp.sum(p, axis=-1)  # [B, H, G, M]
  ordered = jnp.take_along_axis(block_mass, jnp.broadcast_to(plan.order[:, :, None, :], block_mass.shape), -1)
  gathered_upto = jnp.concatenate([jnp.zeros((b, h, g, 1)), jnp.cumsum(ordered, axis=-1)], axis=-1)  # v -> mass

  limit = plan.limit[:, None, None]  # [B, 1, 1]
  if estimator is None:
    used = jnp.broadcast_to(plan.limit[:, None], (b, h))
  else:
    n_chunks = -(-m // c)
    ends = jnp.minimum((jnp.arange(n_chunks) + 1) * c, limit)  # [B, 1, NC]
    starts = jnp.minimum(jnp.arange(n_chunks) * c, limit)
    ran = jnp.arange(n_chunks) * c < limit
    take = lambda x, idx: jnp.take_along_axis(x, jnp.broadcast_to(idx[:, :, None, :], (b, h, g, n_chunks)), -1)
    gathered = take(gathered_upto, jnp.broadcast_to(ends, (b, h, n_chunks)))  # [B, H, G, NC]
    tau_ = tau[:, None, None, None]
    if estimator == "score_mass":
      rem = take(plan.log_remaining[..., :g, :], jnp.broadcast_to(jnp.minimum(ends, m - 1), (b, h, n_chunks)))
      enough = jnp.log(gathered) + gmax[..., None] + jnp.log1p(-tau_) >= jnp.log(tau_) + rem
    elif estimator == "estimate":
      rem = take(plan.log_remaining[..., :g, :], jnp.broadcast_to(jnp.minimum(ends, m - 1), (b, h, n_chunks)))
      n = num_blocks(lengths, s)[:, None, None, None]
      enough = (ends[:, :, None, :] >= n) | (rem - plan.log_remaining[..., :g, :1] <= jnp.log1p(-tau_))
    elif estimator == "last_chunk":
      before = take(gathered_upto, jnp.broadcast_to(starts, (b, h, n_chunks)))
      n = num_blocks(lengths, s)[:, None, None, None]
      enough = (gathered * (1.0 - tau_) * (ends - starts)[:, :, None, :]
                >= tau_ * (gathered - before) * (n - ends[:, :, None, :]))
    else:
      raise ValueError(f"unknown estimator {estimator!r}")
    stop = (ends >= limit) | (
        (tau[:, None, None] < 1.0) & (ends >= plan.n_forced[:, None, None]) & jnp.all(enough, axis=2))
    stop = stop & ran
    first = jnp.argmax(stop, axis=-1)  # [B, H]
    used = jnp.where(jnp.any(stop, axis=-1), jnp.take_along_axis(ends, first[..., None], -1)[..., 0], 0)

  position = jnp.argsort(plan.order, axis=-1)  # block id -> its place in the visit order
  visit = position < used[..., None]  # [B, H, M]
  weights = jnp.where(visit[:, :, None, :, None], p, 0.0)
  return _weighted_values(weights, v_pages, pages), used.astype(jnp.int32)
