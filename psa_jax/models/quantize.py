"""int8 weights for memory-bound decode (what llama.cpp's Q8_0 buys on CPU).

Symmetric, per output channel: w ~= int8 * scale, scale = max |w| / 127 over the input axis. At run time the
activations are quantized per row too and the matmuls run int8 x int8 -> int32 (`models.llama.int8_matmul`):
XLA:CPU has fast integer kernels but converts an int8 matrix to floats before a float dot, which is why a
weight-only scheme did not pay here. Norms, biases, attention and the KV cache keep the model's float dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from psa_jax.models.llama import MATMUL_WEIGHTS, Decoder


def _quantize(w: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """int8 values and the scale, reduced over `axis` (the input axis)."""
  wf = w.astype(jnp.float32)
  scale = jnp.max(jnp.abs(wf), axis=axis, keepdims=True) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)
  q = jnp.clip(jnp.round(wf / scale), -127, 127).astype(jnp.int8)
  return q, jnp.squeeze(scale, axis)


def quantize_int8(model: Decoder) -> Decoder:
  """A copy of `model` whose matmul weights and embedding are int8. Greedy text may differ slightly from the
  float model's, as with any quantization."""
  quantized = nnx.clone(model)  # the float model stays as it was
  if quantized.embed_scale is not None:
    raise ValueError("model is already quantized")
  dtype = model.dtype

  def put(name, axis, reshape=lambda s: s):
    q, scale = _quantize(getattr(quantized, name)[...], axis=axis)
    getattr(quantized, name).set_value(q)
    setattr(quantized, f"{name}_scale", nnx.Param(reshape(scale).astype(dtype)))

  for name in MATMUL_WEIGHTS:  # [L, in, out]: a scale per (layer, out), broadcast over a layer's tokens
    put(name, 1, lambda s: s[:, None, :])
  put("embed", 1)  # [V, E]: a scale per vocabulary row, for the lookup and the tied head alike
  if quantized.lm_head is not None:
    put("lm_head", 0)  # [E, V]
  return quantized
