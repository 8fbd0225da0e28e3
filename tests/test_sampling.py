"""On-device sampling against plain numpy statements of the same rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psa_jax.models.sampling import ban, logprobs, penalize, sample

V = 12


def logits(seed=0, b=3):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, V)) * 3, jnp.float32)


def test_penalties_follow_vllms_rules():
  x = logits()
  counts = np.zeros((3, V), np.int32)
  counts[0, 1], counts[0, 2], counts[2, 7] = 1, 3, 2
  seen = np.zeros((3, V), bool)
  seen[:, 5] = True
  presence, frequency, repetition = np.array([0.5, 0, 0]), np.array([0.25, 0, 0]), np.array([1.3, 1.0, 2.0])
  got = np.asarray(penalize(x, jnp.asarray(counts), jnp.asarray(seen), jnp.asarray(presence, jnp.float32),
                            jnp.asarray(frequency, jnp.float32), jnp.asarray(repetition, jnp.float32)))
  want = np.array(x, np.float64)
  for b in range(3):
    for t in range(V):
      if seen[b, t] or counts[b, t] > 0:
        want[b, t] = want[b, t] / repetition[b] if want[b, t] > 0 else want[b, t] * repetition[b]
      want[b, t] -= frequency[b] * counts[b, t] + presence[b] * (counts[b, t] > 0)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_banned_tokens_are_never_chosen_where_the_ban_holds():
  x = logits(1)
  top = np.asarray(jnp.argmax(x, -1))
  banned = jnp.asarray(np.stack([top, np.full(3, -1)], axis=1), jnp.int32)
  out = np.asarray(jnp.argmax(ban(x, banned, jnp.array([True, False, True])), -1))
  assert out[0] != top[0] and out[1] == top[1] and out[2] != top[2]


def test_min_p_keeps_only_tokens_within_its_ratio_of_the_likeliest():
  x = jnp.asarray([[2.0, 1.9, 1.5, 0.0, -1.0] + [-3.0] * (V - 5)], jnp.float32)
  allowed = {0, 1, 2}  # within 0.2 of the likeliest: exp(-0.1), exp(-0.5); exp(-2) and below are not
  seeds = jnp.arange(200)
  draw = jax.jit(jax.vmap(lambda s: sample(x, s[None], jnp.array([0]), jnp.array([1.0]), jnp.array([1.0]),
                                           jnp.array([0]), jnp.array([0.2]))[0]))
  drawn = set(np.asarray(draw(seeds)).tolist())
  assert drawn <= allowed and len(drawn) > 1


@pytest.mark.parametrize("shape", [(3,), (2, 4)])
def test_logprobs_are_log_softmax_of_the_raw_logits(shape):
  x = jnp.asarray(np.random.default_rng(3).normal(size=(*shape, V)), jnp.float32)
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, V, size=shape), jnp.int32)
  chosen, ids, top = logprobs(x, tokens, 5)
  ref = np.asarray(jax.nn.log_softmax(x, -1))
  np.testing.assert_allclose(np.asarray(chosen), np.take_along_axis(ref, np.asarray(tokens)[..., None], -1)[..., 0],
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(top), -np.sort(-ref, -1)[..., :5], atol=1e-6)
  np.testing.assert_array_equal(np.take_along_axis(ref, np.asarray(ids), -1), np.asarray(top))
