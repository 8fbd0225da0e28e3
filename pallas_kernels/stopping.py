"""PSA's stopping rule and tail estimate: one definition for the Pallas kernel, the XLA loop and the oracle.

Every function here is elementwise over leading axes, so each caller evaluates it in its own layout: the Pallas
kernel after each chunk (per query head), the XLA loop at each chunk boundary of a wide step, the oracle for all
chunks at once. Masses are in any common unit (the callers' running-max units); only ratios matter, except for
"score_mass", whose log masses are absolute.

Estimators (PSAConfig.estimator):
  "last_chunk"  coverage: the gathered mass G is at least tau of G + R, where R, the unread mass, is estimated as
                the last chunk's mass per block times the blocks left (blocks come in descending criticality,
                so this overestimates).
  "score_mass"  coverage, with R estimated from the block scores: sum over unread blocks of n_tokens * exp(score).
  "estimate"    top-p on estimates alone (the Twilight-style baseline): stop once the unread blocks hold at most
                1 - tau of the estimated mass; exact masses are never consulted.
  "value"       value-aware: skipping the unread blocks moves the output by about R / (G + R) * |v_R - o|
                (v_R: the unread tokens' mean value, from the value summaries; o: the output so far). Stop when
                that is at most 1 - tau of |o|. A diffuse tail whose values average out costs little to skip, so
                diffuse heads stop early; a tail that would pull the output away keeps the loop going.
`patience` (PSAConfig) asks the rule to hold at that many consecutive chunk boundaries, so that one low-mass
chunk (a misranked heavy block further on) or a heavy sink cannot end the loop by itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ESTIMATORS = ("score_mass", "last_chunk", "estimate", "value")
# Floor of |o| in the relative change: an output of norm ~0 moves by its absolute change.
_NORM_FLOOR = 1e-6


def tail_mass(chunk_mass: jax.Array, blocks_in_chunk: jax.Array, blocks_left: jax.Array) -> jax.Array:
  """Estimated attention mass of the unread blocks: the last chunk's mass per block times the blocks left."""
  blocks_in_chunk = jnp.asarray(blocks_in_chunk, jnp.float32)
  return chunk_mass * jnp.asarray(blocks_left, jnp.float32) / jnp.maximum(blocks_in_chunk, 1.0)


def tail_weight(gathered: jax.Array, tail: jax.Array) -> jax.Array:
  """R / (G + R): the share of the output the unread blocks would hold; 0 when nothing is left."""
  total = gathered + tail
  return jnp.where(total > 0, tail / jnp.where(total > 0, total, 1.0), 0.0)


def relative_change(gathered, tail, o, v_tail) -> jax.Array:
  """Estimated |output with the tail - output without it| / |output|: R / (G + R) * |v_tail - o| / |o|.

  gathered, tail: [...]; o, v_tail: [..., D]. Returns [...].
  """
  dist = jnp.sqrt(jnp.sum(jnp.square(v_tail - o), axis=-1))
  scale = jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(o), axis=-1)), _NORM_FLOOR)
  return tail_weight(gathered, tail) * dist / scale


def compensate(o, gathered, tail, v_tail) -> jax.Array:
  """The output with the unread blocks folded in from their summaries: (G o + R v_tail) / (G + R). [..., D]."""
  return o + tail_weight(gathered, tail)[..., None] * (v_tail - o)


def tail_value(v_total, n_total, v_read, n_read) -> jax.Array:
  """Mean value of the unread tokens from sums of n_tokens * vmean: (V - V_read) / (N - N_read). [..., D]."""
  left = n_total - n_read
  return (v_total - v_read) / jnp.maximum(left, 1.0)[..., None]


def enough(estimator: str, tau, *, gathered, chunk_mass, blocks_in_chunk, blocks_left, log_gathered=None,
           log_rem=None, log_rem_first=None, change=None) -> jax.Array:
  """Whether one query head may stop after a chunk (before patience and the other heads are consulted).

  gathered: exact mass read so far; chunk_mass: of the last chunk; blocks_in_chunk / blocks_left: counts;
  log_gathered: log of `gathered` in absolute units ("score_mass"); log_rem: log estimated mass from the next
  block on, log_rem_first: of all blocks ("score_mass", "estimate"); change: `relative_change` ("value").
  """
  if estimator == "last_chunk":
    left = jnp.asarray(blocks_left, jnp.float32)
    return gathered * (1.0 - tau) * jnp.asarray(blocks_in_chunk, jnp.float32) >= tau * chunk_mass * left
  if estimator == "score_mass":
    return log_gathered + jnp.log1p(-tau) >= jnp.log(tau) + log_rem
  if estimator == "estimate":
    return (blocks_left <= 0) | (log_rem - log_rem_first <= jnp.log1p(-tau))
  if estimator == "value":
    return change <= 1.0 - tau
  raise ValueError(f"unknown estimator {estimator!r}")


def needs_values(estimator: str | None, compensate_tail: bool) -> bool:
  """Whether the loop must track the running output and the value summaries of the blocks it reads."""
  return estimator == "value" or compensate_tail
