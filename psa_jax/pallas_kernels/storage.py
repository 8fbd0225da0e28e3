"""How KV pages are stored: in their own dtype, or bfloat16 kept as raw uint16 bits ("packed").

XLA:CPU cannot gather bfloat16: it widens the whole bfloat16 operand to float32 before the gather, which for a
KV pool means converting every page of every layer on every decode step (2.5 s per step at 8K, measured on
the development VM), and a bitcast of a bfloat16 pool to uint16 is a full copy there too. A pool that *is* uint16 gathers
as integers, and only the gathered rows are widened: a shift into the high half of a float32, which is exact.
So the CPU arena stores bfloat16 KV packed; accelerators store bfloat16 itself.

Every reader of pages or summaries goes through `unpack` (packed -> float32, otherwise unchanged) and every
writer through `pack`. A packed pool's summaries are packed too: min and max of bfloat16 keys are bfloat16 values,
so only the mean is rounded, as in a bfloat16 pool.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

PACKED = jnp.dtype(jnp.uint16)  # bfloat16 bit patterns
KV_DTYPES = ("model", "float32", "bfloat16")  # how callers name a KV cache dtype; "model": the weights' dtype


def storage_dtype(kv_dtype, backend: str | None = None, *, model_dtype=None) -> jnp.dtype:
  """The pool dtype that holds KV values of `kv_dtype` on `backend` (default: JAX's default backend).

  kv_dtype: one of KV_DTYPES ("model" needs `model_dtype`) or a dtype.
  """
  if isinstance(kv_dtype, str):
    if kv_dtype not in KV_DTYPES:
      raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
    if kv_dtype == "model":
      if model_dtype is None:
        raise ValueError('kv_dtype "model" needs the model\'s dtype')
      kv_dtype = model_dtype
  kv_dtype = jnp.dtype(kv_dtype)
  if kv_dtype == jnp.bfloat16 and (backend or jax.default_backend()) == "cpu":
    return PACKED
  return kv_dtype


def is_packed(dtype) -> bool:
  return jnp.dtype(dtype) == PACKED


def pack(values: jax.Array, dtype) -> jax.Array:
  """`values` as they are stored in a pool of `dtype` (rounded to bfloat16 first when packed)."""
  if is_packed(dtype):
    return lax.bitcast_convert_type(values.astype(jnp.bfloat16), PACKED)
  return values.astype(dtype)


def value_dtype(dtype) -> jnp.dtype:
  """The dtype `unpack` turns a pool of `dtype` into."""
  return jnp.dtype(jnp.float32) if is_packed(dtype) else jnp.dtype(dtype)


def unpack(pages: jax.Array) -> jax.Array:
  """Stored values as numbers: packed -> float32 (bfloat16's bits in the high half), anything else unchanged."""
  if not is_packed(pages.dtype):
    return pages
  return lax.bitcast_convert_type(pages.astype(jnp.uint32) << 16, jnp.float32)
