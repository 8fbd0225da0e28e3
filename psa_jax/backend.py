"""An attention backend: which decode attention a model or engine uses, as one hashable value."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from psa_jax.attention import dense_attention, psa_attention, topk_attention
from psa_jax.config import DenseConfig, PSAConfig, TopKConfig, check_tau

KINDS = {"dense": DenseConfig, "topk": TopKConfig, "psa": PSAConfig}


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
  """kind: "dense", "topk" or "psa"; config: the matching config; impl: see `psa_attention`;
  dense_layers: the model's layers below this index attend densely whatever the kind (Quest and Twilight keep
  layers 0-1 dense: the first layers' attention is the most diffuse, so sparse methods save least there).
  dense_heads: (layer, KV head) pairs that PSA reads densely (tau 1 there) from a request's tau of
  `dense_heads_tau` up; below it they run at tau / dense_heads_tau, so that PSA's cheapest settings stay cheap.
  A few heads of a model retrieve: their mass sits on one block far from the query, which a block summary can
  rank below blocks of diffuse attention. `psa_jax.bench --study=heads` finds them on needle-free text (see
  `retrieval_heads.py`).

  Hashable, so it can be a static argument of a jitted step.
  """

  kind: str = "psa"
  config: DenseConfig | TopKConfig | PSAConfig = PSAConfig()
  impl: str = "auto"
  dense_layers: int = 0
  dense_heads: tuple[tuple[int, int], ...] = ()
  dense_heads_tau: float = PSAConfig.tau

  def __post_init__(self):
    check_tau(self.dense_heads_tau, "dense_heads_tau")
    heads = self.dense_heads
    if (not isinstance(heads, tuple) or
        not all(isinstance(p, tuple) and len(p) == 2 and all(isinstance(i, int) and i >= 0 for i in p)
                for p in heads)):
      raise ValueError(f"dense_heads must be a tuple of (layer, kv_head) pairs of non-negative ints, got {heads!r}")
    if heads and self.kind != "psa":
      raise ValueError(f"dense_heads is a PSA setting; {self.kind} attention got {heads!r}")
    if not isinstance(self.dense_layers, int) or self.dense_layers < 0:
      raise ValueError(f"dense_layers must be a non-negative int, got {self.dense_layers!r}")
    if self.kind not in KINDS:
      raise ValueError(f"attention kind must be one of {tuple(KINDS)}, got {self.kind!r}")
    if not isinstance(self.config, KINDS[self.kind]):
      raise ValueError(f"{self.kind} attention needs a {KINDS[self.kind].__name__}, got {self.config!r}")

  @classmethod
  def named(cls, kind: str, impl: str = "auto", dense_layers: int = 0, dense_heads: tuple = (),
            dense_heads_tau: float = PSAConfig.tau, **config_fields) -> "AttentionBackend":
    if kind not in KINDS:
      raise ValueError(f"attention kind must be one of {tuple(KINDS)}, got {kind!r}")
    return cls(kind, KINDS[kind](**config_fields), impl, dense_layers, tuple(dense_heads), dense_heads_tau)

  def dense(self) -> "AttentionBackend":
    """Dense attention on the same implementation (for the `dense_layers`)."""
    return AttentionBackend("dense", DenseConfig(), self.impl)

  def __call__(self, q, k_pages, v_pages, block_table, lengths, summaries, tau=None):
    """Returns (out [B, Hq, D], blocks_used [B, H]); `tau` ([B] or [B, H]) is used by PSA only."""
    if self.kind == "dense":
      out = dense_attention(q, k_pages, v_pages, block_table, lengths, self.config, impl=self.impl)
      blocks = (lengths + k_pages.shape[2] - 1) // k_pages.shape[2]
      return out, jnp.broadcast_to(blocks[:, None], (q.shape[0], k_pages.shape[0])).astype(jnp.int32)
    if self.kind == "topk":
      return topk_attention(q, k_pages, v_pages, block_table, lengths, summaries, self.config, impl=self.impl)
    return psa_attention(q, k_pages, v_pages, block_table, lengths, summaries, self.config, tau=tau,
                         impl=self.impl)


def dense_head_mask(attention, num_layers: int, num_kv_heads: int) -> np.ndarray:
  """[num_layers, num_kv_heads] bool: the heads `attention` reads densely (its `dense_heads`; none for a backend
  without them). Raises ValueError for a pair outside the model."""
  mask = np.zeros((num_layers, num_kv_heads), bool)
  for layer, head in getattr(attention, "dense_heads", ()):
    if layer >= num_layers or head >= num_kv_heads:
      raise ValueError(f"dense head ({layer}, {head}) is outside a model of {num_layers} layers and "
                       f"{num_kv_heads} KV heads")
    mask[layer, head] = True
  return mask


def head_thresholds(attention, tau: jax.Array, dense: jax.Array) -> jax.Array:
  """One layer's PSA thresholds per sequence and KV head, [B, H], from the sequences' tau [B] and the layer's
  dense heads [H] (a row of `dense_head_mask`): in a dense head, 1 (every block) once tau reaches
  `attention.dense_heads_tau`, tau / dense_heads_tau below it."""
  dense_tau = getattr(attention, "dense_heads_tau", PSAConfig.tau)
  tau = tau[:, None]
  return jnp.where(dense[None, :], jnp.where(tau >= dense_tau, 1.0, tau / dense_tau), tau)
