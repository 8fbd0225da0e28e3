"""Rotary position embeddings, Hugging Face "rotate half" layout, with the frequency scalings of `RopeScaling`
(linear, Llama 3, YaRN), computed as transformers computes them."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from psa_jax.models.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
  """[head_dim // 2] float32, as transformers computes them (float64 math, then float32)."""
  d = config.head_dim
  inv = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
  if config.rope_freq_factors is not None:
    return (inv / np.asarray(config.rope_freq_factors, np.float32)).astype(np.float32)
  s = config.rope_scaling
  if s is None:
    return inv.astype(np.float32)
  if s.rope_type == "linear":
    return (inv / np.float32(s.factor)).astype(np.float32)
  if s.rope_type == "yarn":
    return _yarn(config, s)
  low_wavelen = s.original_max_position / s.low_freq_factor
  high_wavelen = s.original_max_position / s.high_freq_factor
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
  smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, scale: float = 1.0) -> jax.Array:
  """x: [..., heads, head_dim] at positions [...] (broadcast over heads), cos and sin times `scale`
  (`attention_scale`). Computed in float32."""
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [..., d/2]
  cos = jnp.cos(angles)[..., None, :]
  sin = jnp.sin(angles)[..., None, :]
  if scale != 1.0:
    cos, sin = cos * scale, sin * scale
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_scale(config: ModelConfig) -> float:
  """The factor on cos and sin (so on q and k alike): YaRN's attention factor, 1 otherwise."""
  s = config.rope_scaling
  return float(s.attention_factor) if s is not None and s.rope_type == "yarn" else 1.0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  """YaRN's attention temperature, 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(config: ModelConfig, s) -> np.ndarray:
  """YaRN: frequencies that turn fewer than `beta_slow` times over the original context are interpolated
  (divided by `factor`), those that turn more than `beta_fast` times are kept, with a linear ramp between."""
  d, base = config.head_dim, config.rope_theta
  pos_freqs = np.float32(base) ** (np.arange(0, d, 2).astype(np.float32) / np.float32(d))
  extrapolated = (1.0 / pos_freqs).astype(np.float32)
  interpolated = (1.0 / (np.float32(s.factor) * pos_freqs)).astype(np.float32)

  def correction_dim(rotations):
    return d * math.log(s.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
  if s.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, d - 1)
  if low == high:
    high += 0.001  # a ramp of zero width
  ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
  keep = 1 - ramp  # the share of each frequency left unscaled
  return (interpolated * (1 - keep) + extrapolated * keep).astype(np.float32)
