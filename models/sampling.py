"""Token sampling: greedy, temperature, top-k, top-p, all per sequence and all on device."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(
    logits: jax.Array,  # [B, V] float32
    key: jax.Array,  # one PRNG key for the batch
    temperature: jax.Array,  # [B]; 0 = greedy
    top_p: jax.Array,  # [B]; 1 = off
    top_k: jax.Array,  # [B] int32; 0 = off
) -> jax.Array:
  """Returns tokens [B] int32. Greedy rows take the argmax regardless of the other knobs."""
  b, v = logits.shape
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
  sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
  # top-k: everything below the k-th largest logit goes.
  kth = jnp.take_along_axis(sorted_logits, jnp.clip(top_k - 1, 0, v - 1)[:, None], axis=-1)
  scaled = jnp.where((top_k[:, None] > 0) & (scaled < kth), -jnp.inf, scaled)
  # top-p: keep the smallest prefix of the sorted distribution whose mass reaches p.
  sorted_probs = jax.nn.softmax(jnp.sort(scaled, axis=-1)[:, ::-1], axis=-1)
  before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  cutoff_index = jnp.sum(before < top_p[:, None], axis=-1) - 1
  cutoff = jnp.take_along_axis(jnp.sort(scaled, axis=-1)[:, ::-1], cutoff_index[:, None], axis=-1)
  scaled = jnp.where(scaled < cutoff, -jnp.inf, scaled)
  sampled = jax.vmap(jax.random.categorical)(jax.random.split(key, b), scaled).astype(jnp.int32)
  return jnp.where(temperature <= 0, greedy, sampled)
