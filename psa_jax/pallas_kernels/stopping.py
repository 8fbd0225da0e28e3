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
The unread mass R that "value" (and tail compensation) weigh comes from one of two tail estimates
(PSAConfig.tail):
  "last_chunk"  the last chunk's mass per block times the blocks left. Blocks come in descending criticality,
                so this overestimates R, by far on a long context whose tail is many weak blocks: it keeps the
                loop reading long after the output has settled.
  "scores"      the last chunk's exact mass times the block scores' own ratio of the unread blocks' estimated
                mass to the last chunk's: R = M_chunk * E_unread / E_chunk. The scores' absolute scale is off
                (Quest's bound is an upper bound), but their ratios between blocks of one query are far better
                than "every block left is as heavy as the last one".
  "mixed"       the geometric mean of the two weighted by tau: R = R_scores^(1 - tau) * R_last_chunk^tau. tau
                sets both the tolerance and how far the rule trusts the scores: a loose tolerance (low tau) goes
                with the scores' estimate and reaches the smallest budgets, a tight one (tau near 1) with the
                conservative bound, which misses fewer heavy blocks that the scores ranked low. On the quality
                study it follows the better of the two at every budget.
`patience` (PSAConfig) asks the rule to hold at that many consecutive chunk boundaries, so that one low-mass
chunk (a misranked heavy block further on) or a heavy sink cannot end the loop by itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ESTIMATORS = ("score_mass", "last_chunk", "estimate", "value")
TAILS = ("last_chunk", "scores", "mixed")
_TINY_MASS = 1e-30  # floor of a mass before its log ("mixed"); far below any mass the rule compares
# Floor of |o| in the relative change: an output of norm ~0 moves by its absolute change.
_NORM_FLOOR = 1e-6


def tail_mass(chunk_mass: jax.Array, blocks_in_chunk: jax.Array, blocks_left: jax.Array) -> jax.Array:
  """Estimated attention mass of the unread blocks: the last chunk's mass per block times the blocks left."""
  blocks_in_chunk = jnp.asarray(blocks_in_chunk, jnp.float32)
  return chunk_mass * jnp.asarray(blocks_left, jnp.float32) / jnp.maximum(blocks_in_chunk, 1.0)


def scored_tail(chunk_mass: jax.Array, log_rem_begin: jax.Array, log_rem_end: jax.Array,
                blocks_left: jax.Array) -> jax.Array:
  """Estimated mass of the unread blocks from the scores: chunk_mass * E_unread / E_chunk.

  log_rem_begin / log_rem_end: log of the scores' estimated mass from the chunk's first block on / from the first
  unread block on (VisitPlan.log_remaining at those positions). E_chunk = exp(begin) - exp(end), so the ratio is
  r / (1 - r) with r = exp(end - begin), capped where the chunk's own estimate vanishes. 0 when nothing is left.
  """
  diff = log_rem_end - log_rem_begin
  r = jnp.exp(jnp.minimum(jnp.where(jnp.isnan(diff), -jnp.inf, diff), 0.0))  # -inf - -inf: nothing left
  ratio = r / jnp.maximum(1.0 - r, 1e-6)
  return jnp.where(jnp.asarray(blocks_left) > 0, chunk_mass * ratio, 0.0)


def unread_mass(tail: str, chunk_mass, blocks_in_chunk, blocks_left, log_rem_begin=None, log_rem_end=None,
                tau=None) -> jax.Array:
  """The tail estimate R of PSAConfig.tail (see the module docstring); "mixed" needs `tau`."""
  if tail == "last_chunk":
    return tail_mass(chunk_mass, blocks_in_chunk, blocks_left)
  if tail == "scores":
    return scored_tail(chunk_mass, log_rem_begin, log_rem_end, blocks_left)
  if tail == "mixed":
    log = lambda x: jnp.log(jnp.maximum(x, _TINY_MASS))
    t = jnp.asarray(tau, jnp.float32)
    mixed = jnp.exp((1.0 - t) * log(scored_tail(chunk_mass, log_rem_begin, log_rem_end, blocks_left))
                    + t * log(tail_mass(chunk_mass, blocks_in_chunk, blocks_left)))
    return jnp.where(jnp.asarray(blocks_left) > 0, mixed, 0.0)
  raise ValueError(f"unknown tail estimate {tail!r}")


def needs_log_remaining(estimator: str | None, compensate_tail: bool, tail: str) -> bool:
  """Whether the loop reads VisitPlan.log_remaining."""
  return estimator in ("score_mass", "estimate") or (needs_values(estimator, compensate_tail) and tail != "last_chunk")


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
