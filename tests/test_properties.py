"""Properties of PSA over random inputs (hypothesis)."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psa_jax import PSAConfig, dense_attention, psa_attention
from psa_jax.synthetic import synthetic_decode_inputs

TAUS = (0.3, 0.6, 0.8, 0.95, 1.0)


# Every example has the same shapes (three sequences, a 10-block table, a pool of 33 pages) and tau is passed
# traced, so one compiled PSA call per (estimator, chunk_blocks, max_blocks) serves all five taus of an example:
# with a shape and a tau of their own, the examples spent minutes compiling.
WIDTH, POOL = 10, 33


@pytest.mark.slow
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    lengths=st.lists(st.integers(1, 16 * WIDTH), min_size=3, max_size=3),
    max_blocks=st.one_of(st.none(), st.integers(0, 12)),
    estimator=st.sampled_from(["score_mass", "last_chunk", "estimate", "value"]),
    chunk_blocks=st.sampled_from([1, 2, 4]),
)
def test_error_bound_shrinks_as_tau_grows_and_budget_holds(seed, lengths, max_blocks, estimator, chunk_blocks):
  spare = POOL - sum(-(-n // 16) for n in lengths)
  x = synthetic_decode_inputs(seed, lengths, q_heads=4, kv_heads=2, head_dim=16, max_blocks=WIDTH,
                              spare_pages=spare)
  dense = np.asarray(dense_attention(*x[:5], impl="reference"))
  v_max = float(np.abs(np.asarray(x.v_pages)).max())
  config = PSAConfig(max_blocks=max_blocks, estimator=estimator, chunk_blocks=chunk_blocks)
  prev_used, prev_share = None, None
  for tau in TAUS:
    out, used = psa_attention(*x, config, tau=jnp.float32(tau), impl="xla")
    used = np.asarray(used)
    if max_blocks is not None:
      assert (used <= max_blocks).all()
    if prev_used is not None:
      assert (used >= prev_used).all()  # a larger tau never stops earlier
    # The share of the true attention mass covered: never smaller for larger tau, and it bounds the error.
    oracle_used, share = covered_share(x, config, tau)
    np.testing.assert_array_equal(used, oracle_used)
    if prev_share is not None:
      assert (share >= prev_share - 1e-6).all()
    err = np.abs(np.asarray(out) - dense).max(-1)
    assert (err <= 2 * v_max * (1 - share) + 1e-4).all()
    if tau == 1.0 and max_blocks is None:
      assert err.max() < 1e-4
    prev_used, prev_share = used, share


def covered_share(x, config, tau):
  """Share of each query head's dense attention mass that lies in the blocks PSA visited: [B, Hq]."""
  from psa_jax.pallas_kernels import reference, selection
  b, hq, d = x.q.shape
  h = x.k_pages.shape[0]
  qg = x.q.reshape(b, h, hq // h, d)
  scores = selection.block_scores_reference(qg, x.summaries, x.block_table, x.lengths, block_size=16,
                                            score=config.score, sm_scale=d ** -0.5)
  plan = selection.plan_visits(scores, x.lengths, group=hq // h, block_size=16, sink_blocks=config.sink_blocks,
                               local_blocks=config.local_blocks, budget=config.max_blocks,
                               budget_counts_forced=True)
  _, used = reference.ordered_attention_reference(  # the blocks psa_attention reads (tested in test_attention)
      qg, x.k_pages, x.v_pages, x.block_table, x.lengths, plan, jnp.full((b, h), tau),  # per sequence and KV head
      chunk_blocks=config.chunk_blocks, sm_scale=d ** -0.5, estimator=config.estimator, summaries=x.summaries,
      patience=config.patience, compensate=config.compensate, tail=config.tail)
  logits, token_ok, _ = reference._all_logits(qg, x.k_pages, x.block_table, x.lengths, d ** -0.5)
  ok = np.asarray(token_ok)[:, None, None]
  logits = np.where(ok, np.asarray(logits), -np.inf)
  p = np.where(ok, np.exp(logits - logits.max(axis=(-2, -1), keepdims=True)), 0)
  block_mass = p.sum(-1)  # [B, H, G, M]
  position = np.argsort(np.asarray(plan.order), axis=-1)
  visited = position < np.asarray(used)[..., None]
  share = (block_mass * visited[:, :, None]).sum(-1) / block_mass.sum(-1)
  return used, share.reshape(b, hq)
