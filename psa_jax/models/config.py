"""Model configuration for the Llama family (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2)."""

from __future__ import annotations

import dataclasses


ROPE_TYPES = ("linear", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """A RoPE frequency scaling, as transformers' `rope_scaling` / `rope_parameters` define it
  (psa_jax/models/rope.py computes the frequencies).

  rope_type: "linear" (every frequency divided by `factor`), "llama3" (Llama 3.1's smooth band between
  `low_freq_factor` and `high_freq_factor` of the original context) or "yarn" (frequencies blended between
  interpolated and extrapolated by a ramp over the rotations `beta_slow`..`beta_fast` per original context, and
  cos/sin scaled by `attention_factor`). original_max_position: the context the model was pretrained on.
  """

  rope_type: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 0
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  attention_factor: float = 1.0
  truncate: bool = True

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"RoPE scaling {self.rope_type!r} is not implemented (implemented: {ROPE_TYPES})")
    if self.rope_type in ("llama3", "yarn") and self.original_max_position <= 0:
      raise ValueError(f"{self.rope_type} RoPE scaling needs original_max_position > 0")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  arch: str  # "llama", "mistral", "qwen2", "qwen3"
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  rms_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rope_freq_factors: tuple[float, ...] | None = None  # GGUF's rope_freqs: inv_freq is divided by these
  max_context: int = 8192
  tie_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False  # Llama's attention_bias also biases o_proj
  mlp_bias: bool = False  # Llama's mlp_bias: gate, up and down projections
  qk_norm: bool = False  # Qwen3: an RMSNorm over each head's query and key before RoPE
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
