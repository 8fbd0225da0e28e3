"""Bad input fails at trace time with a message that names the problem."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psa_jax import PSAConfig, TopKConfig, dense_attention, psa_attention, topk_attention
from psa_jax.synthetic import synthetic_decode_inputs

X = synthetic_decode_inputs(0, (20, 40), q_heads=4, kv_heads=2, head_dim=32)


@pytest.mark.parametrize("tau", [0.0, -0.1, 1.5, float("nan")])
def test_tau_outside_unit_interval_is_rejected_in_config(tau):
  with pytest.raises(ValueError, match="tau"):
    PSAConfig(tau=tau)


def test_tau_override_outside_unit_interval_is_rejected():
  with pytest.raises(ValueError, match="tau"):
    psa_attention(*X, tau=jnp.array([0.5, 1.2]))


@pytest.mark.parametrize("field,value", [("max_blocks", -1), ("chunk_blocks", 3), ("chunk_blocks", 0),
                                         ("estimator", "magic"), ("score", "max")])
def test_bad_config_fields_are_rejected(field, value):
  with pytest.raises(ValueError, match=field):
    PSAConfig(**{field: value})
  if field in ("chunk_blocks", "score"):
    with pytest.raises(ValueError, match=field):
      TopKConfig(**{field: value})


@pytest.mark.parametrize("change,match", [
    (lambda x: x._replace(q=x.q[:, :3]), "multiple of kv_heads"),
    (lambda x: x._replace(q=x.q[:, :, :16]), "head_dim"),
    (lambda x: x._replace(q=x.q[0]), "q must be"),
    (lambda x: x._replace(v_pages=x.v_pages[:, :-1]), "v_pages"),
    (lambda x: x._replace(block_table=x.block_table[:1]), "block_table"),
    (lambda x: x._replace(lengths=x.lengths[:, None]), "lengths"),
    (lambda x: x._replace(lengths=x.lengths.astype(jnp.float32)), "integer"),
    (lambda x: x._replace(summaries=x.summaries._replace(kmin=x.summaries.kmin[:, :-1])), "summaries.kmin"),
    (lambda x: x._replace(lengths=jnp.array([20, 999])), "lengths must lie"),
    (lambda x: x._replace(block_table=x.block_table.at[1, 2].set(10_000)), "outside the pool"),
    (lambda x: x._replace(block_table=x.block_table.at[0, 0].set(-1)), "outside the pool"),
])
def test_mismatched_inputs_are_rejected(change, match):
  with pytest.raises(ValueError, match=match):
    psa_attention(*change(X))


@pytest.mark.parametrize("attention", ["dense", "topk", "psa"])
def test_block_table_entries_past_the_sequence_may_hold_anything(attention):
  # Sequence 0 has 2 blocks: whatever its table holds after them (a negative id, a page of another sequence)
  # is never read, so the outputs are the same.
  call = {
      "dense": lambda x: dense_attention(*x[:5]),
      "topk": lambda x: topk_attention(*x)[0],
      "psa": lambda x: psa_attention(*x)[0],
  }[attention]
  for junk in (-7, int(X.block_table[1, 0])):
    x = X._replace(block_table=X.block_table.at[0, 2:].set(junk))
    np.testing.assert_array_equal(np.asarray(call(x)), np.asarray(call(X)))


def test_unknown_impl_is_rejected():
  with pytest.raises(ValueError, match="impl"):
    dense_attention(*X[:5], impl="cuda")


def test_shape_errors_surface_under_jit_too():
  with pytest.raises(ValueError, match="multiple of kv_heads"):
    jax.jit(lambda q: dense_attention(q, *X[1:5]))(X.q[:, :3])


@pytest.mark.parametrize("tau", [0.0, -0.1, 1.5, float("nan"), True, "0.5", None])
def test_tau_has_one_check_and_every_entry_uses_it(tau):
  """check_tau is the rule; the attention config, the engine's defaults and the server's field report through it."""
  from psa_jax.config import check_tau
  from psa_jax.serving.config import AttentionDefaults
  from psa_jax.serving.protocol import BadRequest, GenerationDefaults, parse_generation

  with pytest.raises(ValueError, match=r"must be a number in \(0, 1\]"):
    check_tau(tau)
  with pytest.raises(ValueError, match="tau must be a number"):
    PSAConfig(tau=tau)
  with pytest.raises(ValueError, match="psa_tau must be a number"):
    AttentionDefaults(psa_tau=tau)
  if tau is not None:  # a request without psa.tau uses the server's
    with pytest.raises(BadRequest, match="psa.tau' must be a number"):
      parse_generation({"prompt": "x", "psa": {"tau": tau}}, chat=False, prompt_len=1, context=64,
                       defaults=GenerationDefaults(), eos_ids=(0,))
  assert check_tau(1) == 1.0 and check_tau(0.5) == 0.5
