"""Llama-family decoder in Flax NNX: embeddings, RMSNorm, RoPE, GQA attention, SwiGLU MLP, tied or untied LM
head, optional QKV biases (Qwen2).

Layer weights are stacked along a leading [layers] axis and the layers run under `lax.scan`: one compiled
layer body, no Python loop over layers in a step. XLA:CPU copies each layer's weights out of the stacked arrays
before its matmuls (the scan's dynamic slice): at batch 1 that copy moves as many bytes as the matmuls read.
So decode can also take each layer's weights as arrays of their own (`split_layers`) and pick them with a
`lax.switch` on the layer index: every branch reads its layer's arrays in place.

Two entry points, both pure functions of (model state, inputs, paged KV):
  prefill: a span of T tokens per sequence (a prompt or a chunk of one), written into the pages, attending
    densely and causally to everything before it.
  decode:  one token per sequence, attending through the injected backend (dense, top-k or PSA).
Shapes: B batch, T span, E hidden, Hq/H query/KV heads, D head_dim, L layers, M blocks per sequence, V vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from psa_jax.backend import dense_head_mask, head_thresholds
from psa_jax.models import parallel
from psa_jax.models.config import ModelConfig
from psa_jax.models.kv_pages import PagedKV, gather_context, write_tokens
from psa_jax.models.rope import apply_rope, attention_scale, inverse_frequencies

LAYER_WEIGHTS = ("attn_norm", "wq", "wk", "wv", "bq", "bk", "bv", "q_norm", "k_norm", "wo", "bo", "mlp_norm", "w_gate",
                 "w_up", "w_down", "b_gate", "b_up", "b_down")
MATMUL_WEIGHTS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
QUANTIZABLE = MATMUL_WEIGHTS + ("embed", "lm_head")  # int8 with per-channel scales, see psa_jax/models/quantize.py


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  xf = x.astype(jnp.float32)
  normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (normed.astype(x.dtype) * weight).astype(x.dtype)


# XLA:CPU runs an int8 matmul with fewer than this many rows on a slow path (a [1, 576] x [576, 49152] product
# took 29 ms with one row and 1 ms with four), so small batches are padded up to it.
_INT8_MIN_ROWS = 8


def int8_matmul(h: jax.Array, w: jax.Array, w_scale: jax.Array, *, contract: int) -> jax.Array:
  """h [..., K] times int8 weights w ([K, N] for contract=0, [N, K] for contract=1) with per-output scales
  w_scale [N] (or [1, N]).

  W8A8, as llama.cpp does on CPU: each row of h is quantized to int8 with its own scale (max |row| / 127), the
  product accumulates in int32, and both scales are applied after. It reads a quarter of float32's weight bytes
  and uses the CPU's integer dot products; the cost is activation rounding (relative error ~1e-2 per matmul).
  """
  lead, k = h.shape[:-1], h.shape[-1]
  rows = h.reshape(-1, k).astype(jnp.float32)
  n = rows.shape[0]
  a_scale = jnp.max(jnp.abs(rows), axis=-1, keepdims=True) / 127.0
  a_scale = jnp.where(a_scale > 0, a_scale, 1.0)
  hq = jnp.clip(jnp.round(rows / a_scale), -127, 127).astype(jnp.int8)
  if n < _INT8_MIN_ROWS:
    hq = jnp.pad(hq, ((0, _INT8_MIN_ROWS - n), (0, 0)))
  acc = jax.lax.dot_general(hq, w, (((1,), (contract,)), ((), ())), preferred_element_type=jnp.int32)[:n]
  out = acc.astype(jnp.float32) * a_scale * w_scale.reshape(1, -1).astype(jnp.float32)
  return out.reshape(*lead, -1).astype(h.dtype)


class Decoder(nnx.Module):
  """Parameters of a Llama-family decoder; see the module docstring for the forward functions."""

  def __init__(self, config: ModelConfig, *, dtype=jnp.bfloat16, rngs: nnx.Rngs | None = None):
    self.config = config
    rngs = rngs or nnx.Rngs(0)
    c = config
    l, e, f = c.num_layers, c.hidden_size, c.intermediate_size
    qd, kd = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    normal = lambda *shape: nnx.Param((0.02 * jax.random.normal(rngs.params(), shape)).astype(dtype))
    ones = lambda *shape: nnx.Param(jnp.ones(shape, dtype))
    zeros = lambda *shape: nnx.Param(jnp.zeros(shape, dtype))
    self.embed = normal(c.vocab_size, e)
    self.attn_norm, self.mlp_norm = ones(l, e), ones(l, e)
    self.wq, self.wk, self.wv, self.wo = normal(l, e, qd), normal(l, e, kd), normal(l, e, kd), normal(l, qd, e)
    # Zero biases when the checkpoint has none (Llama): one code path for Llama and Qwen2.
    self.bq, self.bk, self.bv = zeros(l, qd), zeros(l, kd), zeros(l, kd)
    self.w_gate, self.w_up, self.w_down = normal(l, e, f), normal(l, e, f), normal(l, f, e)
    # The output and MLP biases of Llama's attention_bias / mlp_bias exist only where the checkpoint has them.
    none = lambda: nnx.data(None)
    self.bo = zeros(l, e) if c.o_bias else none()
    self.b_gate, self.b_up, self.b_down = (zeros(l, f), zeros(l, f), zeros(l, e)) if c.mlp_bias else (
        none(), none(), none())
    self.q_norm, self.k_norm = (ones(l, c.head_dim), ones(l, c.head_dim)) if c.qk_norm else (none(), none())
    self.final_norm = ones(e)
    self.lm_head = None if c.tie_embeddings else normal(e, c.vocab_size)
    self.inv_freq = nnx.Variable(jnp.asarray(inverse_frequencies(c)))
    self.rope_scale = attention_scale(c)
    # Per-output-channel scales of int8 weights (psa_jax/models/quantize.py); None while the weights are floats.
    for name in QUANTIZABLE:
      setattr(self, f"{name}_scale", nnx.data(None))

  @property
  def dtype(self):
    """The compute, activation and KV dtype (norm weights are never quantized)."""
    return self.final_norm[...].dtype

  def _scale(self, name):
    scale = getattr(self, f"{name}_scale")
    return None if scale is None else scale[...]

  def _layers(self):
    value = lambda p: None if p is None else p[...]
    weights = {name: value(getattr(self, name)) for name in LAYER_WEIGHTS}
    weights.update({f"{name}_scale": self._scale(name) for name in MATMUL_WEIGHTS})
    return weights

  def split_layers(self) -> tuple[dict, ...]:
    """Each layer's weights as arrays of their own ({name: array}, one dict per layer), for
    `decode(layers=...)`. Copies: they cost the layer weights' memory again."""
    return _split_layers(self._layers(), self.config.num_layers)

  @staticmethod
  def _mm(h, w, name, bias=None):
    """h @ w[name] (+ w[bias] where the checkpoint has it); int8 weights multiply int8 activations (see
    `int8_matmul`)."""
    scale = w[f"{name}_scale"]
    out = h @ w[name] if scale is None else int8_matmul(h, w[name], scale, contract=0)
    return out if bias is None or w[bias] is None else out + w[bias].astype(out.dtype)

  def _qkv(self, w, h, positions):
    c = self.config
    lead = h.shape[:-1]
    q = (self._mm(h, w, "wq") + w["bq"]).reshape(*lead, c.num_heads, c.head_dim)
    k = (self._mm(h, w, "wk") + w["bk"]).reshape(*lead, c.num_kv_heads, c.head_dim)
    v = (self._mm(h, w, "wv") + w["bv"]).reshape(*lead, c.num_kv_heads, c.head_dim)
    if c.qk_norm:
      q, k = rms_norm(q, w["q_norm"], c.rms_eps), rms_norm(k, w["k_norm"], c.rms_eps)
    inv = self.inv_freq[...]
    return apply_rope(q, positions, inv, self.rope_scale), apply_rope(k, positions, inv, self.rope_scale), v

  def _mlp(self, w, x):
    h = rms_norm(x, w["mlp_norm"], self.config.rms_eps)
    gate, up = self._mm(h, w, "w_gate", "b_gate"), self._mm(h, w, "w_up", "b_up")
    return x + self._mm(jax.nn.silu(gate) * up, w, "w_down", "b_down")

  def _embed(self, tokens):
    x = self.embed[...][tokens].astype(self.dtype)
    scale = self._scale("embed")
    return x if scale is None else x * scale[tokens][..., None]

  def logits(self, x: jax.Array) -> jax.Array:
    """[..., E] -> [..., V] float32."""
    h = rms_norm(x, self.final_norm[...], self.config.rms_eps)
    # The tied head contracts the embedding's hidden axis in place: no transposed copy of [V, E].
    head, contract = (self.embed[...], 1) if self.lm_head is None else (self.lm_head[...], 0)
    scale = self._scale("embed" if self.lm_head is None else "lm_head")
    if scale is not None:
      return int8_matmul(h, head, scale, contract=contract).astype(jnp.float32)
    dims = (((h.ndim - 1,), (contract,)), ((), ()))
    return jax.lax.dot_general(h, head.astype(h.dtype), dims, preferred_element_type=jnp.float32)

  def prefill(
      self,
      tokens: jax.Array,  # [B, T] int32
      start: jax.Array,  # [B] position of tokens[:, 0]
      num: jax.Array,  # [B] valid tokens in the span
      kv: PagedKV,
      block_tables: jax.Array,  # [L, B, M]
      *,
      query_chunk: int = 512,
      collect_qkv: bool = False,
      mesh: Mesh | None = None,
  ):
    """Writes the span's KV and returns the hidden state after the last layer [B, T, E] and the new KV.

    mesh: run sharded over it (psa_jax/models/parallel.py); params and KV must already be placed there.
    collect_qkv: also return every layer's post-RoPE (q [L, B, T, Hq, D], k, v [L, B, T, H, D]), for studies of
    real attention.
    """
    c = self.config
    b, t = tokens.shape
    positions = start[:, None] + jnp.arange(t)[None, :]
    x = self._embed(tokens)

    def layer(carry, xs):
      x, kv = carry
      w, table = xs
      h = rms_norm(x, w["attn_norm"], c.rms_eps)
      q, k, v = self._qkv(w, h, positions)
      kv, attn = attend(kv, q, k, v, table, start, num)
      x = x + self._mm(attn.reshape(b, t, -1).astype(x.dtype), w, "wo", "bo")
      return (self._mlp(w, x), kv), (q, k, v) if collect_qkv else None

    attend = parallel.prefill_attention(functools.partial(prefill_attention_step, query_chunk), mesh)
    (x, kv), qkv = jax.lax.scan(layer, (x, kv), (self._layers(), block_tables))
    return (x, kv, qkv) if collect_qkv else (x, kv)

  def decode(
      self,
      tokens: jax.Array,  # [B] int32
      positions: jax.Array,  # [B] where the new token goes (= tokens already cached)
      kv: PagedKV,
      block_tables: jax.Array,  # [L, B, M]
      attention,  # AttentionBackend
      tau: jax.Array | None = None,  # [B] per-sequence PSA threshold (see `backend.head_thresholds`)
      active: jax.Array | None = None,  # [B] bool; inactive rows write nothing (batch padding, finished)
      mesh: Mesh | None = None,  # run sharded over it (psa_jax/models/parallel.py); B must divide by its data axis
      layers: tuple[dict, ...] | None = None,  # `split_layers()`: read each layer's weights from its own arrays
  ) -> tuple[jax.Array, PagedKV, jax.Array]:
    """One token per sequence: (logits [B, V] float32, new KV, blocks used [L, B, H]).

    layers: None slices each layer's weights out of the stacked arrays (the scan's xs); `split_layers()` makes
    the scan pick layer i's own arrays with a `lax.switch` instead. Same math either way.
    """
    c = self.config
    b = tokens.shape[0]
    x = self._embed(tokens)  # [B, E]
    writes = jnp.ones_like(positions) if active is None else active.astype(positions.dtype)
    if tau is None:
      tau = jnp.full((b,), getattr(attention.config, "tau", 1.0), jnp.float32)
    dense_heads = jnp.asarray(dense_head_mask(attention, c.num_layers, c.num_kv_heads))  # [L, H]

    attend = parallel.decode_attention(functools.partial(decode_attention_step, attention), mesh)

    def project(w, x):
      return self._qkv(w, rms_norm(x, w["attn_norm"], c.rms_eps), positions)

    def finish(w, x, out):
      return self._mlp(w, x + self._mm(out.reshape(b, -1).astype(x.dtype), w, "wo", "bo"))

    if layers is None:
      with_weights = lambda fn, i, w, *args: fn(w, *args)  # w: this layer's slice of the stacked weights
      weights = self._layers()
    else:
      if len(layers) != c.num_layers:
        raise ValueError(f"layers holds {len(layers)} layers' weights, the model has {c.num_layers}")
      # Branch i reads layer i's own arrays in place: no per-step copy of the weights (see the module docstring).
      with_weights = lambda fn, i, _, *args: jax.lax.switch(i, [functools.partial(fn, w) for w in layers], *args)
      weights = None

    def layer(carry, xs):
      x, kv = carry
      i, w, table, dense = xs
      q, k, v = with_weights(project, i, w, x)
      kv, out, used = attend(kv, q, k, v, table, positions, writes, head_thresholds(attention, tau, dense), i)
      return (with_weights(finish, i, w, x, out), kv), used

    (x, kv), used = jax.lax.scan(layer, (x, kv), (jnp.arange(c.num_layers), weights, block_tables, dense_heads))
    return self.logits(x), kv, used


def decode_attention_step(attention, gather_rows, kv: PagedKV, q, k, v, table, positions, writes, tau, layer):
  """One layer's attention for one new token per sequence: the token's k, v go into the arena, then `attention`
  (an AttentionBackend: dense, top-k, or PSA with each sequence's tau) reads the sequence's pages. Layers below
  `attention.dense_layers` attend densely. `Decoder.decode` calls this through `parallel.decode_attention`, which
  on a mesh runs it per device on its own KV heads; `gather_rows` collects the whole batch's rows for the write
  (every data replica holds every sequence's pages) and is the identity without a mesh.

  q [B, Hq, D]; k, v [B, H, D]; table [B, M]; positions, writes [B]; tau [B, H]; layer [] (its index).
  Returns (kv, out [B, Hq, D], blocks read [B, H]).
  """
  k_all, v_all, table_all, pos_all, writes_all = gather_rows((k, v, table, positions, writes))
  kv = write_tokens(kv, k_all[:, None], v_all[:, None], table_all, pos_all, writes_all)
  args = (q, kv.k, kv.v, table, positions + 1, kv.summaries, tau)
  dense_layers = getattr(attention, "dense_layers", 0)
  if dense_layers:  # the first layers attend densely (their attention is the most diffuse)
    return kv, *jax.lax.cond(layer < dense_layers, lambda a: attention.dense()(*a), lambda a: attention(*a), args)
  return kv, *attention(*args)


def prefill_attention_step(query_chunk: int, kv: PagedKV, q, k, v, table, start, num):
  """One layer's attention for a span of prompt tokens per sequence: the span's k, v go into the arena, then
  each query attends causally to its sequence's context (dense: prompts are read whole). `Decoder.prefill`
  calls this through `parallel.prefill_attention` (per device on its own KV heads on a mesh).

  q [B, T, Hq, D]; k, v [B, T, H, D]; table [B, M]; start, num [B]. Returns (kv, out [B, T, Hq, D]).
  """
  kv = write_tokens(kv, k, v, table, start, num)
  pos = start[:, None] + jnp.arange(q.shape[1])[None, :]
  return kv, _causal_context_attention(q, gather_context(kv.k, table), gather_context(kv.v, table), pos, query_chunk)


@functools.partial(jax.jit, static_argnums=1)
def _split_layers(stacked: dict, num_layers: int) -> tuple[dict, ...]:
  return tuple(jax.tree.map(lambda a: a[i], stacked) for i in range(num_layers))


def _causal_context_attention(q, k_ctx, v_ctx, positions, query_chunk, key_block: int = 512):
  """q [B, T, Hq, D] at positions [B, T] against context [B, H, C, D]: key j is visible to a query at
  position p when j <= p. Queries go in chunks of `query_chunk`; for each chunk the keys are visited in blocks
  of `key_block` with an online softmax, only up to the chunk's last position, so a prompt's cost grows with the
  context actually before it (causal skipping), not with the padded table."""
  b, t, hq, d = q.shape
  h, c = k_ctx.shape[1], k_ctx.shape[2]
  g = hq // h
  qg = q.reshape(b, t, h, g, d)
  kb = min(key_block, c)
  if c % kb:  # the engine's power-of-two tables never pad; other callers' keys beyond c are masked anyway
    pad = ((0, 0), (0, 0), (0, kb - c % kb), (0, 0))
    k_ctx, v_ctx = jnp.pad(k_ctx, pad), jnp.pad(v_ctx, pad)
    c = k_ctx.shape[2]

  def chunk(args):
    qc, pc = args  # [B, tc, H, G, D], [B, tc]
    tc = qc.shape[1]
    # [G * tc, D] x [D, key block] per KV head: one plain batched matmul, a layout XLA:CPU ran ~3x faster
    # than the same contraction with the group and query axes apart (measured ad hoc on the development VM).
    rows = jnp.transpose(qc, (0, 2, 3, 1, 4)).reshape(b, h, g * tc, d).astype(jnp.float32) * d ** -0.5

    def body(j, carry):
      m, l, acc = carry  # [B, H, G*tc], [B, H, G*tc], [B, H, G*tc, D]
      k = jax.lax.dynamic_slice_in_dim(k_ctx, j * kb, kb, axis=2)
      v = jax.lax.dynamic_slice_in_dim(v_ctx, j * kb, kb, axis=2)
      logits = jnp.einsum("bhqd,bhcd->bhqc", rows.astype(k.dtype), k, preferred_element_type=jnp.float32)
      visible = (j * kb + jnp.arange(kb))[None, None, :] <= pc[:, :, None]  # [B, tc, kb]
      logits = jnp.where(visible[:, None, None], logits.reshape(b, h, g, tc, kb), -jnp.inf).reshape(logits.shape)
      m_new = jnp.maximum(m, jnp.max(logits, axis=-1))  # finite: key 0 is visible from the first block on
      p = jnp.exp(logits - m_new[..., None])
      correction = jnp.exp(m - m_new)
      acc = acc * correction[..., None] + jnp.einsum("bhqc,bhcd->bhqd", p.astype(v.dtype), v,
                                                     preferred_element_type=jnp.float32)
      return m_new, l * correction + jnp.sum(p, axis=-1), acc

    init = (jnp.full((b, h, g * tc), -jnp.inf, jnp.float32), jnp.zeros((b, h, g * tc), jnp.float32),
            jnp.zeros((b, h, g * tc, d), jnp.float32))
    n_blocks = jnp.minimum(jnp.max(pc) // kb + 1, c // kb)
    _, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    out = (acc / l[..., None]).reshape(b, h, g, tc, d)
    return jnp.transpose(out, (0, 3, 1, 2, 4))  # [B, tc, H, G, D]

  if t <= query_chunk:
    return chunk((qg, positions)).reshape(b, t, hq, d)
  n = -(-t // query_chunk)
  pad = n * query_chunk - t
  qp = jnp.pad(qg, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0))).reshape(b, n, query_chunk, h, g, d)
  pp = jnp.pad(positions, ((0, 0), (0, pad))).reshape(b, n, query_chunk)
  out = jax.lax.map(chunk, (jnp.moveaxis(qp, 1, 0), jnp.moveaxis(pp, 1, 0)))  # [n, B, chunk, H, G, D]
  return jnp.moveaxis(out, 0, 1).reshape(b, n * query_chunk, hq, d)[:, :t]
