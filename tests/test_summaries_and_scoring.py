"""Block summaries, block scores and the visit order."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from psa_jax.pallas_kernels import scoring, selection
from psa_jax.pallas_kernels.progressive import INFO_WIDTH
from psa_jax import BlockSummaries, summarize_pages, update_summaries
from psa_jax.pallas_kernels.summaries import mean_keys, score_box
from psa_jax.synthetic import synthetic_decode_inputs


def test_summaries_are_boxes_and_means_of_the_valid_tokens_only():
  rng = np.random.default_rng(0)
  k = jnp.asarray(rng.normal(size=(2, 5, 8, 4)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, 5, 8, 4)), jnp.float32)
  s = summarize_pages(k, v, jnp.array([3, 1]), jnp.array([5, 8]))
  for i, (page, n) in enumerate([(3, 5), (1, 8)]):
    keys = np.asarray(k[:, page, :n])
    np.testing.assert_allclose(s.kmin[:, i], keys.min(axis=1))
    np.testing.assert_allclose(s.kmax[:, i], keys.max(axis=1))
    np.testing.assert_allclose(s.hmin[:, i], 0.5 * (keys.min(axis=1) + keys.mean(axis=1)), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s.hmax[:, i], 0.5 * (keys.max(axis=1) + keys.mean(axis=1)), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(mean_keys(s)[:, i], keys.mean(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.vmean[:, i], v[:, page, :n].mean(axis=1), rtol=1e-6)


@pytest.mark.parametrize("score, fields", [("minmax", ("kmin", "kmax")), ("hybrid", ("hmin", "hmax"))])
def test_each_bound_reads_the_two_stored_rows_of_its_box(score, fields):
  s = summarize_pages(*(jnp.asarray(np.random.default_rng(5).normal(size=(2, 3, 4, 4)), jnp.float32)
                        for _ in range(2)), jnp.array([0, 2]), jnp.array([4, 3]))
  lower, upper = score_box(s, score)
  assert lower is getattr(s, fields[0]) and upper is getattr(s, fields[1])


def test_appending_token_by_token_equals_summarizing_once():
  rng = np.random.default_rng(1)
  k = jnp.asarray(rng.normal(size=(2, 4, 8, 4)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, 4, 8, 4)), jnp.float32)
  stale = BlockSummaries(*(jnp.asarray(rng.normal(size=(2, 4, 4)), jnp.float32) for _ in BlockSummaries._fields))
  s = stale  # a reused page: whatever it summarized before must not leak in
  for n in range(1, 7):
    s = update_summaries(s, k, v, jnp.array([2]), jnp.array([n]))
  once = summarize_pages(k, v, jnp.array([2]), jnp.array([6]))
  for got, want, old in zip(s, once, stale):
    np.testing.assert_allclose(got[:, 2], want[:, 0], rtol=1e-6)
    np.testing.assert_array_equal(got[:, 0], old[:, 0])  # untouched pages stay


def test_padding_entries_leave_summaries_untouched():
  k = jnp.ones((1, 3, 4, 2), jnp.bfloat16)
  s = BlockSummaries.zeros(1, 3, 2)
  s2 = update_summaries(s, k, 2 * k, jnp.array([0, 1]), jnp.array([0, 2]))
  assert not np.asarray(s2.kmax[:, 0], np.float32).any()
  np.testing.assert_array_equal(np.asarray(s2.kmax[:, 1], np.float32), 1.0)
  np.testing.assert_array_equal(np.asarray(s2.vmean[:, 1], np.float32), 2.0)
  assert all(x.dtype == jnp.bfloat16 for x in s2)


def test_minmax_score_bounds_every_key_logit():
  x = synthetic_decode_inputs(0, (70, 33), q_heads=4, kv_heads=2, head_dim=32)
  qg = x.q.reshape(2, 2, 2, 32)
  scores = selection.block_scores_reference(qg, x.summaries, x.block_table, x.lengths, block_size=16,
                                            score="minmax", sm_scale=1.0)
  k = np.asarray(x.k_pages)
  for b in range(2):
    for j in range(-(-int(x.lengths[b]) // 16)):
      page = int(x.block_table[b, j])
      n = min(16, int(x.lengths[b]) - 16 * j)
      logits = np.einsum("hgd,htd->hgt", np.asarray(qg[b]), k[:, page, :n])
      assert (logits.max(-1) <= np.asarray(scores[b, :, :, j]) + 1e-4).all()


@pytest.mark.parametrize("score", ["mean", "minmax", "hybrid"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_block_scores_match_reference(score, dtype):
  x = synthetic_decode_inputs(1, (1, 17, 200), q_heads=6, kv_heads=2, head_dim=32, dtype=dtype, max_blocks=16)
  qg = jnp.pad(x.q.reshape(3, 2, 3, 32), ((0, 0), (0, 0), (0, 13), (0, 0)))
  info = jnp.zeros((3, INFO_WIDTH), jnp.int32).at[:, 0].set(x.lengths)
  kw = dict(block_size=16, score=score, sm_scale=1 / math.sqrt(32))
  got = scoring.block_scores_pallas(qg, x.summaries, x.block_table, info, interpret=True, blocks_per_tile=8, **kw)
  want = selection.block_scores_reference(qg, x.summaries, x.block_table, x.lengths, **kw)
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  finite = np.isfinite(want)
  np.testing.assert_allclose(np.asarray(got)[finite], np.asarray(want)[finite], rtol=1e-4, atol=1e-4)


def test_visit_order_puts_forced_blocks_first_then_descending_criticality():
  rng = np.random.default_rng(3)
  scores = jnp.asarray(rng.normal(size=(1, 1, 2, 10)), jnp.float32)
  lengths = jnp.array([16 * 8 - 3])  # 8 blocks; blocks 8 and 9 lie past the end
  plan = selection.plan_visits(scores, lengths, group=2, block_size=16, sink_blocks=1, local_blocks=2,
                               budget=4, budget_counts_forced=False)
  order = np.asarray(plan.order[0, 0])
  assert set(order[:3]) == {0, 6, 7}
  assert set(order[8:]) == {8, 9}
  assert int(plan.n_forced[0]) == 3 and int(plan.limit[0]) == 7
  ntok = np.array([16] * 7 + [13])
  share = np.exp(np.asarray(scores[0, 0, :, :8])) * ntok
  share /= share.sum(-1, keepdims=True)
  crit = share.max(0)[order[3:8]]
  assert (np.diff(crit) <= 0).all()
  # log_remaining[i] is the estimated mass of blocks order[i:], in logs.
  masses = np.exp(np.asarray(scores[0, 0, 0, :8])) * ntok
  np.testing.assert_allclose(np.exp(plan.log_remaining[0, 0, 0, 3]), masses[order[3:8]].sum(), rtol=1e-5)


@pytest.mark.parametrize("m", [2, 10, 512, 8192])
def test_visit_order_sorts_by_criticality_to_its_precision_and_breaks_ties_by_block_id(m):
  rng = np.random.default_rng(m)
  crit = rng.uniform(size=(2, 3, m)).astype(np.float32) ** 4  # spans several binades
  crit[..., 1::7] = crit[..., :1]  # exact ties with block 0
  forced = rng.uniform(size=(2, 1, m)) < 0.05
  valid = np.arange(m)[None, None, :] < rng.integers(1, m + 1, size=(2, 1, 1))
  forced &= valid
  order = np.asarray(selection._descending_order(jnp.asarray(crit), jnp.asarray(forced), jnp.asarray(valid)))
  for b in range(2):
    for h in range(3):
      o = order[b, h]
      assert sorted(o.tolist()) == list(range(m))
      n_forced, n_valid = int(forced[b, 0].sum()), int(valid[b, 0].sum())
      assert forced[b, 0, o[:n_forced]].all() and (np.diff(o[:n_forced]) > 0).all()
      assert not valid[b, 0, o[n_valid:]].any() and (np.diff(o[n_valid:]) > 0).all()
      ranked = crit[b, h, o[n_forced:n_valid]]
      # Non-increasing up to the packing's precision: 2^-(23 - id bits) relative.
      tolerance = 2.0 ** -(23 - max(1, (m - 1).bit_length())) * 2
      assert (ranked[1:] <= ranked[:-1] * (1 + tolerance)).all()
      ids = o[n_forced:n_valid]
      for value in np.unique(ranked):
        tied = ids[ranked == value]
        assert (np.diff(tied) > 0).all()
      if m <= 16:  # well separated: exactly a stable argsort
        key = np.where(forced[b, 0], 2.0, np.where(valid[b, 0], crit[b, h], -1.0))
        np.testing.assert_array_equal(o, np.argsort(-key, kind="stable"))


def test_hybrid_score_is_the_average_of_the_mean_logit_and_the_bound():
  x = synthetic_decode_inputs(2, (90, 40), q_heads=6, kv_heads=2, head_dim=32)
  qg = x.q.reshape(2, 2, 3, 32)
  kw = dict(block_size=16, sm_scale=0.25)
  score = lambda kind: np.asarray(selection.block_scores_reference(qg, x.summaries, x.block_table, x.lengths,
                                                                   score=kind, **kw))
  hybrid, mean, bound = score("hybrid"), score("mean"), score("minmax")
  finite = np.isfinite(mean)
  np.testing.assert_array_equal(np.isfinite(hybrid), finite)
  np.testing.assert_allclose(hybrid[finite], 0.5 * (mean + bound)[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [1, 3, 16, 100, 512, 513, 8192])
def test_remaining_mass_is_the_reverse_cumulative_logsumexp_with_its_tail_precise(m):
  rng = np.random.default_rng(m)
  x = (rng.normal(size=(2, 3, m)) * 5).astype(np.float32)
  x[0, 0, m // 2:] = -np.inf  # blocks past the end
  x[1, 2, :] = -np.inf  # a padded head: nothing anywhere
  x[1, 0, -min(m, 4):] = -60.0  # a tail ~60 nats below the rest keeps its own digits, not the head's rounding
  got = np.asarray(selection._reverse_cumlogsumexp(jnp.asarray(x)))
  with np.errstate(divide="ignore"):
    want = np.log(np.cumsum(np.exp(x.astype(np.float64))[..., ::-1], axis=-1)[..., ::-1])
  np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
  finite = np.isfinite(want)
  np.testing.assert_allclose(got[finite], want[finite], rtol=0, atol=1e-5)
