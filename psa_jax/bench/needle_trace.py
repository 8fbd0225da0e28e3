"""Where a needle goes under PSA: for a retrieval item, layer by layer and KV head by KV head, along the answer's
decode steps.

The item's prompt and dense's answer are read once with every layer's q/k/v captured (dense's answer teacher-
forced, so every method is judged on the same queries). At each decode step (a query of the answer) and in
every layer and KV head:
  dense_share  the dense attention mass on the needle's blocks (the largest over the group's query heads);
  rank         where PSA's visit order puts the needle's first block (0: visited first);
  exact_rank   where the exact order (blocks by their dense mass) would put it;
  used         how many blocks PSA read; read: rank < used.
A step where dense puts real mass on the needle (dense_share >= `heavy`) and PSA does not read it is lost to the
order when the exact order would have read it within PSA's budget (exact_rank < used), and to the stop
otherwise: even the exact order would have stopped before it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from psa_jax.attention import psa_attention
from psa_jax.backend import AttentionBackend, dense_head_mask, head_thresholds
from psa_jax.bench import fidelity
from psa_jax.config import PSAConfig
from psa_jax.pallas_kernels import reference, selection

HEAVY = 0.1  # dense mass on the needle that makes a (step, layer, head) one that retrieves it


def psa_visits(q, k_pages, v_pages, tables, lengths, summaries, tau, *, config: PSAConfig, group: int):
  """Where PSA's order puts each block and how many blocks PSA reads, for rows q [P, Hq, D] with tables [P, M],
  lengths [P], tau [P] or [P, H]: (position [P, H, M], block -> its place in the visit order; used [P, H])."""
  d = q.shape[-1]
  s = k_pages.shape[2]
  qg = q.reshape(q.shape[0], k_pages.shape[0], group, d)
  _, used = psa_attention(q, k_pages, v_pages, tables, lengths, summaries, config, tau=tau, impl="xla")
  scores = selection.block_scores_reference(qg, summaries, tables, lengths, block_size=s, score=config.score,
                                            sm_scale=1.0 / math.sqrt(d))
  plan = selection.plan_visits(scores, lengths, group=group, block_size=s, sink_blocks=config.sink_blocks,
                               local_blocks=config.local_blocks, budget=config.max_blocks,
                               budget_counts_forced=True, min_blocks=config.min_blocks)
  return jnp.argsort(plan.order, axis=-1), used


def dense_block_mass(q, k_pages, tables, lengths, *, group: int):
  """Dense attention's mass on each block, the largest over each KV head's query heads: [P, H, M]."""
  d = q.shape[-1]
  qg = q.reshape(q.shape[0], k_pages.shape[0], group, d)
  logits, token_ok, _ = reference._all_logits(qg, k_pages, tables, lengths, 1.0 / math.sqrt(d))  # [P, H, G, M, S]
  logits = jnp.where(token_ok[:, None, None], logits, -jnp.inf)
  prob = jax.nn.softmax(logits.reshape(*logits.shape[:3], -1), axis=-1).reshape(logits.shape)
  return jnp.max(jnp.sum(prob, axis=-1), axis=2)


@functools.partial(jax.jit, static_argnames=("config", "group"))
def _layer(q, k_pages, v_pages, tables, lengths, summaries, tau, needle, *, config: PSAConfig, group: int):
  """One layer's rows: q [P, Hq, D], tables [P, M], lengths [P], needle [M] bool (the needle's blocks).
  Returns dense_share, rank, exact_rank, used, each [P, H]."""
  s = k_pages.shape[2]
  position, used = psa_visits(q, k_pages, v_pages, tables, lengths, summaries, tau, config=config, group=group)
  big = jnp.iinfo(jnp.int32).max
  rank = jnp.min(jnp.where(needle[None, None], position, big), axis=-1)
  mass = dense_block_mass(q, k_pages, tables, lengths, group=group)
  dense_share = jnp.sum(jnp.where(needle[None, None], mass, 0.0), axis=-1)
  n = selection.num_blocks(lengths, s)
  m = tables.shape[1]
  j = jnp.arange(m)
  valid = j[None, :] < n[:, None]
  forced = valid & ((j[None, :] < config.sink_blocks) | (j[None, :] >= n[:, None] - config.local_blocks))
  needle_mass = jnp.max(jnp.where(needle[None, None], mass, -1.0), axis=-1)  # its heaviest block
  heavier = jnp.sum(valid[:, None] & ~forced[:, None] & (mass > needle_mass[..., None]), axis=-1)
  needle_forced = jnp.any(needle[None] & forced, axis=-1)[:, None]
  exact_rank = jnp.where(needle_forced, 0, jnp.sum(forced, axis=-1)[:, None] + heavier)
  return dense_share, rank, exact_rank.astype(jnp.int32), used


def trace(lm, prompt: list[int], answer: list[int], needle_tokens: tuple[int, int], config: PSAConfig, tau: float,
          block_size: int = 16, dense_heads: tuple[tuple[int, int], ...] = ()) -> dict:
  """The trace of one item: arrays [steps, layers, kv_heads] (see the module docstring) for the decode steps of
  `answer` (dense's answer ids, its first token from the prefill) after `prompt`, PSA treating the (layer, KV
  head) pairs of `dense_heads` as the engine does (`backend.head_thresholds`)."""
  c = lm.model.config
  ids = list(prompt) + list(answer)
  positions = [len(prompt) + i for i in range(len(answer) - 1)]  # the queries that chose answer[1:]
  if not positions:
    raise ValueError("an answer of one token has no decode step to trace")
  q, k, v = fidelity.capture(lm, ids, block_size)
  queries, k_pages, v_pages, tables, lengths, summaries = fidelity.paged_inputs(q, k, v, positions, block_size)
  blocks = tables.shape[1]
  needle = np.zeros(blocks, bool)
  needle[needle_tokens[0] // block_size:(needle_tokens[1] - 1) // block_size + 1] = True
  steps = len(positions)
  backend = AttentionBackend("psa", config, dense_heads=dense_heads)
  dense = dense_head_mask(backend, c.num_layers, c.num_kv_heads)
  out = {key: [] for key in ("dense_share", "rank", "exact_rank", "used")}
  for layer in range(c.num_layers):
    rows = slice(layer * steps, (layer + 1) * steps)
    result = _layer(queries[rows], k_pages, v_pages, tables[rows], lengths[rows], summaries,
                    head_thresholds(backend, jnp.full((steps,), tau, jnp.float32), jnp.asarray(dense[layer])),
                    jnp.asarray(needle), config=config,
                    group=c.num_heads // c.num_kv_heads)
    for key, value in zip(out, jax.device_get(result)):
      out[key].append(np.asarray(value))
  arrays = {key: np.stack(value, axis=1) for key, value in out.items()}  # [steps, layers, kv_heads]
  arrays["read"] = arrays["rank"] < arrays["used"]
  return arrays


def attribute(arrays: dict, heavy: float = HEAVY) -> dict:
  """Counts over the (step, layer, head) cells where dense puts at least `heavy` of its mass on the needle:
  read by PSA, lost to the order, lost to the stop; with the mean ranks and blocks read of the lost ones."""
  hot = arrays["dense_share"] >= heavy
  lost = hot & ~arrays["read"]
  by_order = lost & (arrays["exact_rank"] < arrays["used"])
  mean = lambda key, mask: float(arrays[key][mask].mean()) if mask.any() else None
  return {"heavy": int(hot.sum()), "read": int((hot & arrays["read"]).sum()), "lost_to_order": int(by_order.sum()),
          "lost_to_stop": int((lost & ~by_order).sum()), "lost_rank": mean("rank", lost),
          "lost_exact_rank": mean("exact_rank", lost), "lost_used": mean("used", lost),
          "heavy_heads": int(hot.any(axis=0).sum())}
