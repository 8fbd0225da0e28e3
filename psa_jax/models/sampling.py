"""Token sampling on device, per sequence: penalties, banned tokens, greedy, temperature, min-p, top-k, top-p,
and the log-probabilities an API reports.

The order is vLLM's: penalties and bans change the logits (so greedy decoding sees them too), then temperature,
then the min-p, top-k and top-p filters. Reported log-probabilities are the model's own (raw logits).

Randomness is keyed by (seed, position of the token being drawn), so a request samples the same tokens alone
or in a batch, in one decode window or many, and after being preempted and recomputed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(
    logits: jax.Array,  # [B, V] float32
    seeds: jax.Array,  # [B] int32
    positions: jax.Array,  # [B] position the sampled token will take
    temperature: jax.Array,  # [B]; 0 = greedy
    top_p: jax.Array,  # [B]; 1 = off
    top_k: jax.Array,  # [B] int32; 0 = off
    min_p: jax.Array | None = None,  # [B]; 0 = off
) -> jax.Array:
  """Returns tokens [B] int32. Greedy rows take the argmax regardless of the other knobs."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  min_p = jnp.zeros_like(temperature) if min_p is None else min_p
  # Sorting the vocabulary costs more than the rest of a small model's step on CPU: skip it when every row is
  # greedy (the common serving case), on device, without a host round trip.
  return jax.lax.cond(jnp.all(temperature <= 0), lambda: greedy,
                      lambda: _sample(logits, greedy, seeds, positions, temperature, top_p, top_k, min_p))


def penalize(
    logits: jax.Array,  # [B, V] float32
    counts: jax.Array,  # [B, V] int32: how often each token occurs in the output so far
    prompt_seen: jax.Array,  # [B, V] bool: tokens of the prompt
    presence: jax.Array,  # [B]; 0 = off
    frequency: jax.Array,  # [B]; 0 = off
    repetition: jax.Array,  # [B]; 1 = off
) -> jax.Array:
  """vLLM's penalties: repetition divides positive (multiplies negative) logits of every token of the prompt or
  output; frequency subtracts per occurrence in the output, presence once per token present in it."""
  seen = prompt_seen | (counts > 0)
  r = repetition[:, None]
  logits = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
  return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def ban(logits: jax.Array, token_ids: jax.Array, active: jax.Array) -> jax.Array:
  """Makes token_ids [B, K] (-1 padded) impossible in the rows where active [B] holds (min_tokens: no stop
  token yet)."""
  vocab = jnp.arange(logits.shape[-1], dtype=jnp.int32)
  hit = jnp.any(vocab[None, :, None] == token_ids[:, None, :], axis=-1) & active[:, None]
  return jnp.where(hit, -jnp.inf, logits)


def logprobs(logits: jax.Array, tokens: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The model's log-probability of tokens [B] (or [B, T] with logits [B, T, V]) and its k most likely tokens:
  (token logprob [...], top ids [..., k] int32, top logprobs [..., k])."""
  lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  chosen = jnp.take_along_axis(lp, jnp.maximum(tokens, 0)[..., None], axis=-1)[..., 0]
  top, ids = jax.lax.top_k(lp, k)
  return chosen, ids.astype(jnp.int32), top


def _sample(logits, greedy, seeds, positions, temperature, top_p, top_k, min_p):
  v = logits.shape[-1]
  scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
  # min-p: tokens less likely than min_p times the most likely one go (a log-space threshold: no softmax).
  floor = jnp.max(scaled, axis=-1, keepdims=True) + jnp.log(jnp.maximum(min_p, 1e-30))[:, None]
  scaled = jnp.where((min_p[:, None] > 0) & (scaled < floor), -jnp.inf, scaled)
  descending = jnp.sort(scaled, axis=-1)[:, ::-1]
  # top-k: everything below the k-th largest logit goes.
  kth = jnp.take_along_axis(descending, jnp.clip(top_k - 1, 0, v - 1)[:, None], axis=-1)
  keep = (top_k[:, None] <= 0) | (scaled >= kth)
  # top-p: the smallest prefix of the (top-k filtered) sorted distribution whose mass reaches p.
  descending = jnp.where((top_k[:, None] <= 0) | (descending >= kth), descending, -jnp.inf)
  probs = jax.nn.softmax(descending, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  last = jnp.maximum(jnp.sum(mass_before < top_p[:, None], axis=-1) - 1, 0)
  cutoff = jnp.take_along_axis(descending, last[:, None], axis=-1)
  keep &= scaled >= cutoff
  masked = jnp.where(keep, scaled, -jnp.inf)
  keys = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seeds, positions)
  sampled = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
  return jnp.where(temperature <= 0, greedy, sampled)
