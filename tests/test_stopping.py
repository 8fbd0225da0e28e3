"""The stopping rule's pieces (psa_jax/pallas_kernels/stopping.py) on numbers worked out by hand."""

import jax.numpy as jnp
import numpy as np
import pytest

from psa_jax.pallas_kernels import stopping

# A tau whose complement is exact in binary, so boundary cases compare equal quantities exactly.
TAU = 0.75


def test_tail_mass_is_last_chunk_mass_per_block_times_blocks_left():
  assert float(stopping.tail_mass(jnp.float32(2.0), 4, 6)) == 3.0
  assert float(stopping.tail_mass(jnp.float32(2.0), 4, 0)) == 0.0
  # An empty chunk counts as one block rather than dividing by zero.
  assert float(stopping.tail_mass(jnp.float32(2.0), 0, 5)) == 10.0


def test_tail_mass_is_elementwise_over_leading_axes():
  mass = jnp.array([[1.0, 2.0], [4.0, 8.0]])
  np.testing.assert_array_equal(stopping.tail_mass(mass, jnp.array([1, 2]), jnp.array([3, 1])),
                                [[3.0, 1.0], [12.0, 4.0]])


def test_tail_weight_is_the_unread_share_and_zero_when_nothing_is_left():
  assert float(stopping.tail_weight(jnp.float32(3.0), jnp.float32(1.0))) == 0.25
  assert float(stopping.tail_weight(jnp.float32(3.0), jnp.float32(0.0))) == 0.0
  assert float(stopping.tail_weight(jnp.float32(0.0), jnp.float32(0.0))) == 0.0  # not NaN


def test_relative_change_of_a_known_vector():
  # |v - o| = |(3, 4)| = 5 = |o|, and the tail holds a quarter of the mass.
  o, v_tail = jnp.array([3.0, 4.0]), jnp.array([6.0, 8.0])
  assert float(stopping.relative_change(jnp.float32(3.0), jnp.float32(1.0), o, v_tail)) == pytest.approx(0.25)
  # A tail whose mean value is the output itself moves nothing, whatever its mass.
  assert float(stopping.relative_change(jnp.float32(1.0), jnp.float32(100.0), o, o)) == 0.0
  # No tail mass, no change.
  assert float(stopping.relative_change(jnp.float32(3.0), jnp.float32(0.0), o, v_tail)) == 0.0


def test_relative_change_of_a_zero_output_is_its_absolute_change_over_the_floor():
  change = stopping.relative_change(jnp.float32(1.0), jnp.float32(1.0), jnp.zeros(2), jnp.array([3e-6, 4e-6]))
  assert float(change) == pytest.approx(0.5 * 5e-6 / 1e-6, rel=1e-5)


def test_relative_change_is_the_move_that_compensation_makes():
  rng = np.random.default_rng(0)
  o, v_tail = (rng.normal(size=(3, 8)).astype(np.float32) for _ in range(2))
  gathered, tail = jnp.array([1.0, 2.0, 5.0]), jnp.array([0.5, 0.0, 7.0])
  moved = np.linalg.norm(np.asarray(stopping.compensate(o, gathered, tail, v_tail)) - o, axis=-1)
  np.testing.assert_allclose(moved / np.linalg.norm(o, axis=-1),
                             stopping.relative_change(gathered, tail, o, v_tail), rtol=1e-5, atol=1e-6)


def test_compensate_equals_the_exact_output_when_the_tail_estimate_is_exact():
  # Read tokens of any weights; unread tokens of equal weight, so their mean value is their weighted mean.
  rng = np.random.default_rng(1)
  w_read, v_read = rng.uniform(0.1, 2.0, size=5), rng.normal(size=(5, 4))
  w_unread, v_unread = np.full(7, 0.3), rng.normal(size=(7, 4))
  exact = (w_read @ v_read + w_unread @ v_unread) / (w_read.sum() + w_unread.sum())
  o = w_read @ v_read / w_read.sum()
  out = stopping.compensate(jnp.asarray(o, jnp.float32), jnp.float32(w_read.sum()), jnp.float32(w_unread.sum()),
                            jnp.asarray(v_unread.mean(0), jnp.float32))
  np.testing.assert_allclose(out, exact, rtol=1e-5, atol=1e-6)


def test_compensate_with_no_tail_returns_the_output_unchanged():
  o = jnp.array([0.1, -0.3, 0.7])
  np.testing.assert_array_equal(stopping.compensate(o, jnp.float32(2.0), jnp.float32(0.0), jnp.full(3, 1e30)), o)


def test_tail_value_is_the_mean_value_of_the_unread_tokens():
  # Blocks of 16, 16 and 5 tokens with mean values 1, 2 and 3 (in each channel); the first block is read.
  ntok, vmean = np.array([16.0, 16.0, 5.0]), np.array([[1.0, -1.0], [2.0, -2.0], [3.0, -3.0]])
  v_total, n_total = ntok @ vmean, ntok.sum()
  v_tail = stopping.tail_value(jnp.asarray(v_total), jnp.float32(n_total), jnp.asarray(16.0 * vmean[0]),
                               jnp.float32(16.0))
  np.testing.assert_allclose(v_tail, [(32.0 + 15.0) / 21.0, -(32.0 + 15.0) / 21.0], rtol=1e-6)


def test_tail_value_with_every_token_read_is_finite():
  v = jnp.array([4.0, 8.0])
  np.testing.assert_array_equal(stopping.tail_value(v, jnp.float32(37.0), v, jnp.float32(37.0)), [0.0, 0.0])


def test_tail_value_is_elementwise_over_leading_axes():
  # Per chunk boundary [g]: sums read so far [g, D] against one total [D].
  v_tail = stopping.tail_value(jnp.array([10.0, 20.0]), jnp.float32(10.0), jnp.array([[0.0, 0.0], [4.0, 8.0]]),
                               jnp.array([0.0, 6.0]))
  np.testing.assert_allclose(v_tail, [[1.0, 2.0], [1.5, 3.0]])


def enough(estimator, **kw):
  return bool(stopping.enough(estimator, jnp.float32(TAU), **kw))


@pytest.mark.parametrize("gathered, want", [(3.0, True), (2.99, False), (3.01, True)])
def test_last_chunk_enough_at_its_boundary(gathered, want):
  # G (1 - tau) * blocks_in_chunk >= tau * chunk_mass * blocks_left: 3 * 0.25 * 2 = 0.75 * 2 * 1.
  assert enough("last_chunk", gathered=jnp.float32(gathered), chunk_mass=jnp.float32(2.0), blocks_in_chunk=2,
                blocks_left=1) == want


def test_last_chunk_is_enough_once_no_block_is_left():
  assert enough("last_chunk", gathered=jnp.float32(1e-3), chunk_mass=jnp.float32(1e3), blocks_in_chunk=1,
                blocks_left=0)


@pytest.mark.parametrize("margin, want", [(1e-3, True), (-1e-3, False)])
def test_score_mass_enough_when_gathered_is_tau_of_gathered_plus_remaining(margin, want):
  # G / (G + R) >= 3/4  <=>  log G - log R >= log 3.
  kw = dict(chunk_mass=None, blocks_in_chunk=1, blocks_left=1)
  assert enough("score_mass", gathered=None, log_gathered=jnp.float32(np.log(3.0) + margin),
                log_rem=jnp.float32(0.0), **kw) == want
  # The log masses are absolute: shifting both by the same amount changes nothing.
  assert enough("score_mass", gathered=None, log_gathered=jnp.float32(np.log(3.0) + margin + 50.0),
                log_rem=jnp.float32(50.0), **kw) == want


@pytest.mark.parametrize("margin, blocks_left, want", [(-1e-3, 3, True), (1e-3, 3, False), (1e-3, 0, True)])
def test_estimate_enough_when_the_unread_estimated_share_is_at_most_one_minus_tau(margin, blocks_left, want):
  first = 2.5
  assert enough("estimate", gathered=None, chunk_mass=None, blocks_in_chunk=1, blocks_left=blocks_left,
                log_rem=jnp.float32(first + np.log(0.25) + margin), log_rem_first=jnp.float32(first)) == want


@pytest.mark.parametrize("change, want", [(0.25, True), (0.2500001, False), (0.0, True)])
def test_value_enough_when_the_change_is_at_most_one_minus_tau(change, want):
  assert enough("value", gathered=None, chunk_mass=None, blocks_in_chunk=1, blocks_left=1,
                change=jnp.float32(change)) == want


@pytest.mark.parametrize("change, want", [(0.0, True), (1e-9, False)])
def test_value_at_tau_one_is_never_enough_unless_nothing_would_change(change, want):
  got = stopping.enough("value", jnp.float32(1.0), gathered=None, chunk_mass=None, blocks_in_chunk=1,
                        blocks_left=1, change=jnp.float32(change))
  assert bool(got) == want


def test_enough_is_elementwise_over_query_heads():
  got = stopping.enough("last_chunk", jnp.float32(TAU), gathered=jnp.array([3.0, 2.0, 30.0]),
                        chunk_mass=jnp.array([1.0, 1.0, 12.0]), blocks_in_chunk=1, blocks_left=1)
  np.testing.assert_array_equal(got, [True, False, False])


def test_unknown_estimator_is_rejected():
  with pytest.raises(ValueError, match="unknown estimator"):
    stopping.enough("oracle", jnp.float32(TAU), gathered=1.0, chunk_mass=1.0, blocks_in_chunk=1, blocks_left=1)


@pytest.mark.parametrize("estimator, compensate, want", [
    ("value", False, True), ("value", True, True), ("last_chunk", True, True), ("last_chunk", False, False),
    ("score_mass", False, False), ("estimate", False, False), (None, False, False),
])
def test_needs_values_only_for_the_value_rule_or_compensation(estimator, compensate, want):
  assert stopping.needs_values(estimator, compensate) == want


def test_scored_tail_scales_the_chunk_mass_by_the_scores_ratio_of_unread_to_chunk():
  # Scores estimate 6 from the chunk's first block on and 2 from the first unread block on: the chunk holds an
  # estimated 4, the unread blocks 2, so the unread mass is half the chunk's exact mass.
  got = stopping.scored_tail(jnp.float32(3.0), jnp.log(jnp.float32(6.0)), jnp.log(jnp.float32(2.0)), 5)
  assert float(got) == pytest.approx(1.5, rel=1e-6)


def test_scored_tail_is_exact_when_the_scores_are_proportional_to_the_true_masses():
  mass = np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.25])  # descending, as the loop visits them
  scale = 7.3  # the scores' absolute scale does not matter
  log_rem = np.log(np.cumsum((scale * mass)[::-1])[::-1])  # log estimated mass from block i on
  for begin, end in [(0, 2), (2, 3), (3, 5)]:
    got = stopping.scored_tail(jnp.float32(mass[begin:end].sum()), jnp.float32(log_rem[begin]),
                               jnp.float32(log_rem[end]), len(mass) - end)
    assert float(got) == pytest.approx(mass[end:].sum(), rel=1e-5)


def test_scored_tail_is_zero_when_nothing_is_left_and_never_nan():
  assert float(stopping.scored_tail(jnp.float32(3.0), jnp.float32(1.0), jnp.float32(0.5), 0)) == 0.0
  assert float(stopping.scored_tail(jnp.float32(3.0), jnp.float32(1.0), jnp.float32(-jnp.inf), 4)) == 0.0
  # A padded query head: every estimate is -inf.
  assert float(stopping.scored_tail(jnp.float32(0.0), jnp.float32(-jnp.inf), jnp.float32(-jnp.inf), 4)) == 0.0
  # A chunk the scores call empty: the ratio is capped, not infinite.
  assert np.isfinite(float(stopping.scored_tail(jnp.float32(1.0), jnp.float32(2.0), jnp.float32(2.0), 4)))


def test_unread_mass_dispatches_on_the_tail_estimate():
  chunk = jnp.float32(2.0)
  assert float(stopping.unread_mass("last_chunk", chunk, 4, 6)) == 3.0
  assert float(stopping.unread_mass("scores", chunk, 4, 6, log_rem_begin=jnp.log(jnp.float32(4.0)),
                                    log_rem_end=jnp.log(jnp.float32(1.0)))) == pytest.approx(2.0 / 3.0, rel=1e-6)
  with pytest.raises(ValueError, match="unknown tail"):
    stopping.unread_mass("oracle", chunk, 4, 6)


def test_mixed_tail_moves_from_the_scored_estimate_to_the_last_chunk_bound_as_tau_grows():
  chunk, begin, end = jnp.float32(2.0), jnp.log(jnp.float32(4.0)), jnp.log(jnp.float32(1.0))
  scored = 2.0 / 3.0  # the chunk holds an estimated 3, the unread blocks 1
  bound = 3.0  # 2 per 4 blocks, 6 blocks left
  mixed = lambda tau: float(stopping.unread_mass("mixed", chunk, 4, 6, log_rem_begin=begin, log_rem_end=end,
                                                 tau=jnp.float32(tau)))
  assert mixed(0.0) == pytest.approx(scored, rel=1e-5)
  assert mixed(1.0) == pytest.approx(bound, rel=1e-5)
  assert mixed(0.5) == pytest.approx(np.sqrt(scored * bound), rel=1e-5)
  assert scored < mixed(0.3) < mixed(0.7) < bound
  # Nothing left: nothing unread, whatever tau.
  assert float(stopping.unread_mass("mixed", chunk, 4, 0, log_rem_begin=begin, log_rem_end=end, tau=0.5)) == 0.0


@pytest.mark.parametrize("estimator, compensate, tail, want", [
    ("value", False, "scores", True), ("value", False, "mixed", True), ("value", False, "last_chunk", False), ("last_chunk", True, "scores", True),
    ("last_chunk", False, "scores", False), ("score_mass", False, "last_chunk", True), (None, False, "scores", False),
])
def test_log_remaining_is_read_for_score_based_rules_and_the_scored_tail(estimator, compensate, tail, want):
  assert stopping.needs_log_remaining(estimator, compensate, tail) == want

