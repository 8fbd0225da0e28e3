"""An attention backend: which decode attention a model or engine uses, as one hashable value."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from psa_jax.attention import dense_attention, psa_attention, topk_attention
from psa_jax.config import DenseConfig, PSAConfig, TopKConfig

KINDS = {"dense": DenseConfig, "topk": TopKConfig, "psa": PSAConfig}


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
  """kind: "dense", "topk" or "psa"; config: the matching config; impl: see `psa_attention`;
  dense_layers: the model's layers below this index attend densely whatever the kind (Quest and Twilight keep
  layers 0-1 dense: the first layers' attention is the most diffuse, so sparse methods save least there).

  Hashable, so it can be a static argument of a jitted step.
  """

  kind: str = "psa"
  config: DenseConfig | TopKConfig | PSAConfig = PSAConfig()
  impl: str = "auto"
  dense_layers: int = 0

  def __post_init__(self):
    if not isinstance(self.dense_layers, int) or self.dense_layers < 0:
      raise ValueError(f"dense_layers must be a non-negative int, got {self.dense_layers!r}")
    if self.kind not in KINDS:
      raise ValueError(f"attention kind must be one of {tuple(KINDS)}, got {self.kind!r}")
    if not isinstance(self.config, KINDS[self.kind]):
      raise ValueError(f"{self.kind} attention needs a {KINDS[self.kind].__name__}, got {self.config!r}")

  @classmethod
  def named(cls, kind: str, impl: str = "auto", dense_layers: int = 0, **config_fields) -> "AttentionBackend":
    if kind not in KINDS:
      raise ValueError(f"attention kind must be one of {tuple(KINDS)}, got {kind!r}")
    return cls(kind, KINDS[kind](**config_fields), impl, dense_layers)

  def dense(self) -> "AttentionBackend":
    """Dense attention on the same implementation (for the `dense_layers`)."""
    return AttentionBackend("dense", DenseConfig(), self.impl)

  def __call__(self, q, k_pages, v_pages, block_table, lengths, summaries, tau=None):
    """Returns (out [B, Hq, D], blocks_used [B, H]); `tau` is used by PSA only."""
    if self.kind == "dense":
      out = dense_attention(q, k_pages, v_pages, block_table, lengths, self.config, impl=self.impl)
      blocks = (lengths + k_pages.shape[2] - 1) // k_pages.shape[2]
      return out, jnp.broadcast_to(blocks[:, None], (q.shape[0], k_pages.shape[0])).astype(jnp.int32)
    if self.kind == "topk":
      return topk_attention(q, k_pages, v_pages, block_table, lengths, summaries, self.config, impl=self.impl)
    return psa_attention(q, k_pages, v_pages, block_table, lengths, summaries, self.config, tau=tau,
                         impl=self.impl)
