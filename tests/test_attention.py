"""Specification of the three decode attentions: every implementation against the loop-free oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psa_jax.pallas_kernels import storage
from psa_jax import (DenseConfig, PSAConfig, TopKConfig, dense_attention, psa_attention, summarize_pages,
                     topk_attention)
from psa_jax.synthetic import synthetic_decode_inputs

# Ragged: a single token, block boundaries on both sides, and lengths that end mid-block.
RAGGED = (1, 16, 17, 70, 128)
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def inputs(group=2, kv_heads=2, dtype=jnp.float32, lengths=RAGGED, seed=0, **kw):
  return synthetic_decode_inputs(seed, lengths, q_heads=group * kv_heads, kv_heads=kv_heads, dtype=dtype, **kw)


def close(a, b, dtype):
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=TOL[dtype],
                             rtol=TOL[dtype])


def dense_oracle(x):
  return dense_attention(x.q, x.k_pages, x.v_pages, x.block_table, x.lengths, impl="reference")


@pytest.mark.parametrize("impl", ["xla", "pallas", "reference"])
@pytest.mark.parametrize("estimator", ["score_mass", "last_chunk", "estimate"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_psa_with_tau_one_equals_dense(impl, estimator, dtype):
  x = inputs(dtype=dtype)
  out, used = psa_attention(*x, PSAConfig(tau=1.0, estimator=estimator), impl=impl)
  close(out, dense_oracle(x), dtype)
  np.testing.assert_array_equal(used, np.broadcast_to((-(-np.asarray(x.lengths) // 16))[:, None], used.shape))


@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_dense_matches_oracle_for_gqa_group_sizes(group, impl):
  x = inputs(group=group, kv_heads=1 if group == 8 else 2, lengths=(1, 33, 64))
  close(dense_attention(x.q, x.k_pages, x.v_pages, x.block_table, x.lengths, impl=impl), dense_oracle(x),
        jnp.float32)


def test_dense_oracle_is_plain_softmax_over_contiguous_keys():
  x = inputs(lengths=(5, 40))
  out = np.asarray(dense_oracle(x))
  for b, n in enumerate(np.asarray(x.lengths)):
    pages = np.asarray(x.block_table[b])
    k = np.asarray(x.k_pages)[:, pages].reshape(2, -1, 32)[:, :n]  # [H, n, D]
    v = np.asarray(x.v_pages)[:, pages].reshape(2, -1, 32)[:, :n]
    for h in range(4):
      logits = k[h // 2] @ np.asarray(x.q[b, h]) / np.sqrt(32)
      w = np.exp(logits - logits.max())
      np.testing.assert_allclose(out[b, h], w @ v[h // 2] / w.sum(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("config", [
    PSAConfig(tau=0.9),
    PSAConfig(tau=0.5, estimator="last_chunk", chunk_blocks=1),
    PSAConfig(tau=0.8, score="minmax", chunk_blocks=2, sink_blocks=0, local_blocks=2),
    PSAConfig(tau=0.99, max_blocks=3, chunk_blocks=2),
    PSAConfig(tau=0.7, estimator="estimate", chunk_blocks=1),
    PSAConfig(tau=0.5, min_blocks=3, chunk_blocks=1),
], ids=["score_mass", "last_chunk", "minmax", "capped", "top_p_estimate", "floor"])
def test_psa_matches_oracle(impl, dtype, config):
  x = inputs(group=3, dtype=dtype, seed=1)
  out, used = psa_attention(*x, config, impl=impl)
  ref_out, ref_used = psa_attention(*x, config, impl="reference")
  np.testing.assert_array_equal(used, ref_used)
  close(out, ref_out, dtype)


@pytest.mark.parametrize("config", [
    PSAConfig(tau=0.9),
    PSAConfig(tau=0.6, chunk_blocks=1),
    PSAConfig(tau=0.95, estimator="score_mass"),
    PSAConfig(tau=0.8, estimator="estimate", chunk_blocks=2),
], ids=["last_chunk", "one_block_chunks", "score_mass", "top_p_estimate"])
def test_xla_path_for_a_single_long_sequence_matches_oracle(config):
  # One sequence whose heads stop at different points inside the XLA path's wide iterations.
  x = inputs(group=3, seed=2, lengths=(1000,), heavy_blocks=2, strength=3.0)
  out, used = psa_attention(*x, config, impl="xla")
  ref_out, ref_used = psa_attention(*x, config, impl="reference")
  np.testing.assert_array_equal(used, ref_used)
  close(out, ref_out, jnp.float32)
  assert (np.asarray(used) % (8 * config.chunk_blocks) != 0).any()  # some head stopped inside a wide iteration


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("score", ["minmax", "mean"])
def test_topk_matches_oracle(impl, score):
  x = inputs(group=4, seed=2)
  config = TopKConfig(k_blocks=2, score=score, chunk_blocks=2)
  out, used = topk_attention(*x, config, impl=impl)
  ref_out, ref_used = topk_attention(*x, config, impl="reference")
  np.testing.assert_array_equal(used, ref_used)
  close(out, ref_out, jnp.float32)


@pytest.mark.parametrize("impl", ["xla", "pallas", "reference"])
def test_topk_with_every_block_equals_dense(impl):
  x = inputs()
  out, _ = topk_attention(*x, TopKConfig(k_blocks=8), impl=impl)
  close(out, dense_oracle(x), jnp.float32)


def test_topk_uses_sink_local_and_k_blocks():
  x = inputs(lengths=(1, 16, 17, 70, 128))
  _, used = topk_attention(*x, TopKConfig(k_blocks=2, sink_blocks=1, local_blocks=1), impl="xla")
  n = -(-np.asarray(x.lengths) // 16)
  np.testing.assert_array_equal(used[:, 0], np.minimum(n, 4))


@pytest.mark.parametrize("impl", ["xla", "pallas", "reference"])
def test_empty_budget_attends_to_nothing(impl):
  x = inputs()
  out, used = psa_attention(*x, PSAConfig(max_blocks=0), impl=impl)
  assert not np.asarray(used).any() and not np.asarray(out).any()
  out, used = topk_attention(*x, TopKConfig(k_blocks=0, sink_blocks=0, local_blocks=0), impl=impl)
  assert not np.asarray(used).any() and not np.asarray(out).any()


@pytest.mark.parametrize("impl", ["xla", "pallas", "reference"])
def test_empty_sequence_gives_zero_output(impl):
  x = inputs(lengths=(0, 20))
  out, used = psa_attention(*x, PSAConfig(tau=0.9), impl=impl)
  assert not np.asarray(out[0]).any() and not np.asarray(used[0]).any()
  close(dense_attention(x.q, x.k_pages, x.v_pages, x.block_table, x.lengths, impl=impl)[1], dense_oracle(x)[1],
        jnp.float32)


def test_psa_reads_fewer_blocks_on_sparse_attention_and_stays_close():
  x = inputs(lengths=(1024, 2048), seed=3, heavy_blocks=2, strength=3.0)
  out, used = psa_attention(*x, PSAConfig(tau=0.9, chunk_blocks=2), impl="xla")
  n = -(-np.asarray(x.lengths) // 16)
  assert (np.asarray(used) < n[:, None] / 4).all(), used
  dense = np.asarray(dense_oracle(x))
  rel = np.linalg.norm(np.asarray(out) - dense, axis=-1) / np.linalg.norm(dense, axis=-1)
  assert rel.max() < 0.3, rel


def test_psa_floor_reads_at_least_min_blocks_beyond_sink_and_local():
  x = inputs(lengths=(1024, 2048), seed=3, heavy_blocks=2, strength=3.0)
  _, free = psa_attention(*x, PSAConfig(tau=0.9, chunk_blocks=2), impl="xla")
  _, floored = psa_attention(*x, PSAConfig(tau=0.9, chunk_blocks=2, min_blocks=20), impl="xla")
  assert (np.asarray(free) < 22).any()  # without the floor the rule stops early somewhere
  assert (np.asarray(floored) >= 22).all() and (np.asarray(floored) >= np.asarray(free)).all()


def test_per_sequence_tau_override_is_traced_without_recompiling():
  x = inputs(seed=4)
  fn = jax.jit(lambda tau: psa_attention(*x, PSAConfig(), tau=tau, impl="xla"))
  _, used_loose = fn(jnp.full((5,), 0.3, jnp.float32))
  _, used_strict = fn(jnp.ones((5,), jnp.float32))
  assert fn._cache_size() == 1
  assert (np.asarray(used_strict) >= np.asarray(used_loose)).all()
  np.testing.assert_array_equal(used_strict[:, 0], -(-np.asarray(x.lengths) // 16))


def test_composes_with_jit_and_vmap():
  x = inputs(lengths=(20, 40))
  stacked_q = jnp.stack([x.q, 2 * x.q])  # [2, B, Hq, D]
  fn = jax.jit(jax.vmap(lambda q: psa_attention(q, *x[1:], PSAConfig(tau=1.0), impl="xla")[0]))
  out = fn(stacked_q)
  for i in range(2):
    close(out[i], dense_attention(stacked_q[i], *x[1:5], impl="reference"), jnp.float32)


def test_dense_config_chunk_does_not_change_result():
  x = inputs()
  a = dense_attention(x.q, x.k_pages, x.v_pages, x.block_table, x.lengths, DenseConfig(chunk_blocks=1), impl="xla")
  b = dense_attention(x.q, x.k_pages, x.v_pages, x.block_table, x.lengths, DenseConfig(chunk_blocks=8), impl="xla")
  close(a, b, jnp.float32)


def packed_and_rounded(x, dtype=jnp.float32):
  """The same bfloat16 KV twice: packed (uint16 bits, the CPU arena's storage) and as `dtype` values."""
  k, v = (storage.pack(p, storage.PACKED) for p in (x.k_pages, x.v_pages))
  summaries = summarize_pages(k, v, jnp.arange(k.shape[1]), jnp.full((k.shape[1],), k.shape[2]))
  packed = x._replace(k_pages=k, v_pages=v, summaries=summaries)
  values = lambda p: storage.unpack(p).astype(dtype)
  as_values = x._replace(k_pages=values(k), v_pages=values(v), summaries=type(summaries)(*map(values, summaries)))
  return packed, as_values


@pytest.mark.parametrize("impl", ["xla", "pallas", "reference"])
@pytest.mark.parametrize("kind", ["dense", "topk", "psa"])
def test_packed_bfloat16_pages_attend_like_their_values(impl, kind):
  # The kernels read packed pages as the bfloat16 pages they are; the XLA path and the oracle widen them to float32.
  values = jnp.bfloat16 if impl == "pallas" else jnp.float32
  packed, as_values = packed_and_rounded(inputs(group=3, seed=5, heavy_blocks=2, strength=3.0), values)
  run = {
      "dense": lambda x: (dense_attention(*x[:5], impl=impl), None),
      "topk": lambda x: topk_attention(*x, TopKConfig(k_blocks=2, chunk_blocks=2), impl=impl),
      "psa": lambda x: psa_attention(*x, PSAConfig(tau=0.8, chunk_blocks=1), impl=impl),
  }[kind]
  out, used = run(packed)
  want_out, want_used = run(as_values)
  if used is not None:
    np.testing.assert_array_equal(used, want_used)
  close(out, want_out, values)


def test_pages_of_an_integer_dtype_other_than_packed_are_rejected():
  x = inputs()
  with pytest.raises(ValueError, match="float dtype or uint16"):
    dense_attention(x.q, x.k_pages.astype(jnp.int8), x.v_pages.astype(jnp.int8), x.block_table, x.lengths)


def test_summaries_must_be_packed_exactly_when_the_pages_are():
  packed, as_float = packed_and_rounded(inputs())
  with pytest.raises(ValueError, match="packed exactly when"):
    psa_attention(*packed._replace(summaries=as_float.summaries), impl="xla")


# The value-aware options (stopping.py): the "value" estimator, patience, tail compensation and the two tail
# estimates ("mixed", the default, "scores" and "last_chunk"), with the hybrid block score. Each config is a compile of
# its own, so the cases below are a spread, not a product.
VALUE_CONFIGS = {
    "value": PSAConfig(tau=0.9, estimator="value", score="hybrid"),
    "value_patience": PSAConfig(tau=0.7, estimator="value", score="hybrid", patience=2, chunk_blocks=1),
    "value_compensated": PSAConfig(tau=0.95, estimator="value", score="hybrid", compensate=True, chunk_blocks=2),
    "value_patience_compensated": PSAConfig(tau=0.8, estimator="value", score="hybrid", patience=2,
                                            compensate=True, chunk_blocks=1),
    "last_chunk_patience_compensated": PSAConfig(tau=0.6, estimator="last_chunk", score="hybrid", patience=2,
                                                 compensate=True, chunk_blocks=1),
    "value_capped_compensated": PSAConfig(tau=0.99, estimator="value", score="hybrid", compensate=True,
                                          max_blocks=3, chunk_blocks=2),
    "value_chunk_tail": PSAConfig(tau=0.9, estimator="value", score="hybrid", patience=2, tail="last_chunk",
                                  chunk_blocks=1),
    "value_chunk_tail_compensated": PSAConfig(tau=0.8, estimator="value", score="minmax", compensate=True,
                                              tail="last_chunk", chunk_blocks=2),
    "value_scores_tail_minmax": PSAConfig(tau=0.6, estimator="value", score="minmax", patience=1, chunk_blocks=2,
                                          tail="scores"),
}


def held_to_oracle(x, config, impl, dtype):
  out, used = psa_attention(*x, config, impl=impl)
  ref_out, ref_used = psa_attention(*x, config, impl="reference")
  np.testing.assert_array_equal(used, ref_used)
  close(out, ref_out, dtype)
  return used


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("name, dtype", [
    *((name, jnp.float32) for name in VALUE_CONFIGS),
    ("value_patience", jnp.bfloat16), ("value_compensated", jnp.bfloat16), ("value_chunk_tail", jnp.bfloat16),
])
def test_value_rule_patience_and_compensation_match_oracle(impl, name, dtype):
  held_to_oracle(inputs(group=3, dtype=dtype, seed=1), VALUE_CONFIGS[name], impl, dtype)


@pytest.mark.parametrize("group", [1, 4, 8])  # 3: the cases above
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_value_rule_matches_oracle_for_gqa_group_sizes(group, impl):
  x = inputs(group=group, kv_heads=1 if group == 8 else 2, seed=6, heavy_blocks=2, strength=3.0)
  held_to_oracle(x, VALUE_CONFIGS["value_patience_compensated"], impl, jnp.float32)


@pytest.mark.parametrize("impl", ["xla", "pallas", "reference"])
def test_value_rule_with_tau_one_equals_dense_with_or_without_compensation(impl):
  x = inputs()
  n = -(-np.asarray(x.lengths) // 16)
  outs = []
  for compensate in (False, True):
    config = PSAConfig(tau=1.0, estimator="value", score="hybrid", patience=2, compensate=compensate)
    out, used = psa_attention(*x, config, impl=impl)
    close(out, dense_oracle(x), jnp.float32)
    np.testing.assert_array_equal(used, np.broadcast_to(n[:, None], used.shape))
    outs.append(np.asarray(out))
  # Nothing is left unread, so the compensation adds exactly nothing.
  np.testing.assert_array_equal(outs[1], outs[0])


@pytest.mark.parametrize("impl", ["xla", "pallas", "reference"])
def test_value_rule_with_empty_budget_attends_to_nothing_even_compensated(impl):
  x = inputs()
  config = PSAConfig(max_blocks=0, estimator="value", score="hybrid", patience=2, compensate=True)
  out, used = psa_attention(*x, config, impl=impl)
  assert not np.asarray(used).any() and not np.asarray(out).any()


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_value_rule_on_packed_bfloat16_pages_matches_oracle(impl):
  packed, _ = packed_and_rounded(inputs(group=3, seed=5, heavy_blocks=2, strength=3.0))
  # The kernels read packed pages as bfloat16 and round q to it; the XLA path and the oracle widen the pages. A q
  # that is already bfloat16-exact makes the logits the same numbers on every path.
  packed = packed._replace(q=packed.q.astype(jnp.bfloat16).astype(jnp.float32))
  held_to_oracle(packed, VALUE_CONFIGS["value_patience_compensated"], impl,
                 jnp.bfloat16 if impl == "pallas" else jnp.float32)


@pytest.mark.parametrize("config, seed", [
    (PSAConfig(tau=0.98, estimator="value", score="hybrid", patience=3, chunk_blocks=1, tail="last_chunk"), 2),
    (PSAConfig(tau=0.9, estimator="value", score="hybrid", patience=2, compensate=True, chunk_blocks=2,
               tail="last_chunk"), 2),
    (PSAConfig(tau=0.9, estimator="value", score="hybrid", patience=2, chunk_blocks=1, tail="scores"), 3),
], ids=["patience_3", "patience_2_compensated", "patience_2_scored_tail"])
def test_xla_value_rule_streak_across_wide_iterations_matches_oracle(config, seed):
  x = inputs(group=3, seed=seed, lengths=(1000,), heavy_blocks=2, strength=3.0)
  used = np.asarray(held_to_oracle(x, config, "xla", jnp.float32))
  stop_chunk = -(-used // config.chunk_blocks) - 1
  assert (stop_chunk % 8 != 7).any()  # some head stopped inside a wide iteration of 8 chunks
  # and the run of boundaries at which the rule held, which stopped it, began in the iteration before
  assert (stop_chunk % 8 < config.patience - 1).any()


@pytest.mark.parametrize("head_dim", [80, 96])
@pytest.mark.parametrize("kind, config", [
    ("dense", DenseConfig()), ("topk", TopKConfig(k_blocks=2, chunk_blocks=2)), ("psa", PSAConfig()),
    ("psa", VALUE_CONFIGS["value_patience_compensated"]),
], ids=["dense", "topk", "psa_default", "psa_compensated"])
def test_a_head_dim_that_is_not_a_power_of_two_runs_on_the_pallas_path(head_dim, kind, config):
  # The Triton lowering takes power-of-two tiles only: the wrapper pads the channels with zeros.
  x = inputs(group=3, seed=1, head_dim=head_dim)
  if kind == "dense":
    out = dense_attention(*x[:5], config, impl="pallas")
    close(out, dense_oracle(x), jnp.float32)
    return
  fn = topk_attention if kind == "topk" else psa_attention
  out, used = fn(*x, config, impl="pallas")
  ref_out, ref_used = fn(*x, config, impl="reference")
  np.testing.assert_array_equal(used, ref_used)
  assert out.shape == x.q.shape
  close(out, ref_out, jnp.float32)


# ------------------------------------------------------------------------------------- per-head thresholds
# tau may be [batch, kv_heads]: each (sequence, KV head) stops on its own threshold, and tau 1 reads that head
# densely (a model's retrieval heads, psa_jax/retrieval_heads.py).


def head_taus(x, seed=0, dense_share=0.3):
  """[B, H] thresholds in [0.3, 0.95], with about `dense_share` of the heads at 1.0."""
  rng = np.random.default_rng(seed)
  shape = (x.q.shape[0], x.k_pages.shape[0])
  tau = rng.uniform(0.3, 0.95, shape)
  return jnp.asarray(np.where(rng.uniform(size=shape) < dense_share, 1.0, tau), jnp.float32)


@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_per_head_tau_matches_oracle(group, impl, dtype):
  x = inputs(group=group, kv_heads=1 if group == 8 else 2, dtype=dtype, seed=7, heavy_blocks=2, strength=3.0)
  tau = head_taus(x, seed=group)
  out, used = psa_attention(*x, PSAConfig(), tau=tau, impl=impl)
  ref_out, ref_used = psa_attention(*x, PSAConfig(), tau=tau, impl="reference")
  np.testing.assert_array_equal(used, ref_used)
  close(out, ref_out, dtype)


@pytest.mark.parametrize("impl", ["xla", "pallas", "reference"])
def test_a_head_at_tau_one_is_dense_and_the_others_are_unchanged(impl):
  x = inputs(kv_heads=2, group=3, lengths=(70, 128, 700), seed=3, heavy_blocks=2, strength=3.0)
  tau = jnp.asarray([[1.0, 0.6]] * 3, jnp.float32)  # KV head 0 dense, KV head 1 at 0.6
  out, used = psa_attention(*x, PSAConfig(), tau=tau, impl=impl)
  sparse_out, sparse_used = psa_attention(*x, PSAConfig(), tau=0.6, impl=impl)
  np.testing.assert_array_equal(used[:, 0], -(-np.asarray(x.lengths) // 16))
  close(out[:, :3], dense_oracle(x)[:, :3], jnp.float32)  # query heads 0-2 read KV head 0
  np.testing.assert_array_equal(used[:, 1], sparse_used[:, 1])
  close(out[:, 3:], sparse_out[:, 3:], jnp.float32)
  assert (np.asarray(sparse_used[:, 0]) < np.asarray(used[:, 0])).any()  # tau 0.6 alone would have stopped early


@pytest.mark.parametrize("impl", ["xla", "pallas", "reference"])
def test_per_head_tau_keeps_empty_and_full_budgets(impl):
  x = inputs(seed=5)
  tau = head_taus(x, seed=1, dense_share=0.5)
  out, used = psa_attention(*x, PSAConfig(max_blocks=0), tau=tau, impl=impl)
  assert not np.asarray(used).any() and not np.asarray(out).any()
  out, used = psa_attention(*x, PSAConfig(), tau=jnp.ones_like(tau), impl=impl)
  close(out, dense_oracle(x), jnp.float32)


def test_a_per_head_tau_of_the_wrong_shape_is_refused():
  x = inputs()
  with pytest.raises(ValueError, match="kv_heads"):
    psa_attention(*x, PSAConfig(), tau=jnp.full((5, 3), 0.9), impl="xla")
  with pytest.raises(ValueError, match="tau must be"):
    psa_attention(*x, PSAConfig(), tau=jnp.full((4,), 0.9), impl="xla")
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    psa_attention(*x, PSAConfig(), tau=np.array([[0.9, 1.5]] * 5), impl="xla")
