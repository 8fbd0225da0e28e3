"""Token sampling: greedy, temperature, top-k, top-p, per sequence and on device.

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
) -> jax.Array:
  """Returns tokens [B] int32. Greedy rows take the argmax regardless of the other knobs."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  # Sorting the vocabulary costs more than the rest of a small model's step on CPU: skip it when every row is
  # greedy (the common serving case), on device, without a host round trip.
  return jax.lax.cond(jnp.all(temperature <= 0), lambda: greedy,
                      lambda: _sample(logits, greedy, seeds, positions, temperature, top_p, top_k))


def _sample(logits, greedy, seeds, positions, temperature, top_p, top_k):
  v = logits.shape[-1]
  scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
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
