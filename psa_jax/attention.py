"""The library calls: dense, top-k (Quest) and PSA decode attention over a paged KV cache.

Shapes (one query token per sequence):
  q:            [batch, q_heads, head_dim]
  k_pages:      [kv_heads, num_pages, block_size, head_dim]   (v_pages alike), a float dtype, or uint16 holding
                bfloat16 bits (the CPU arena's packed storage, psa_jax/pallas_kernels/storage.py)
  block_table:  [batch, max_blocks_per_seq] int32, logical block -> page
  lengths:      [batch] int32, tokens in each sequence (0 allowed: the output is zeros)
  summaries:    BlockSummaries, each [kv_heads, num_pages, head_dim], stored like the pages (packed or not)

The pages are laid out head-major so that one program (sequence, KV head) gathers whole contiguous
[block_size, head_dim] tiles with a single index, the pattern the Triton lowering handles best (as in
jax.experimental.pallas.ops.gpu.paged_attention).

impl: "pallas" runs the Pallas kernels (compiled on GPU, interpreted elsewhere), "xla" the same decisions as
plain XLA ops (the CPU path), "reference" the loop-free oracle, "auto" Pallas on GPU and XLA otherwise.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from psa_jax.pallas_kernels import progressive, reference, scoring, selection, stopping, storage
from psa_jax.pallas_kernels.summaries import BlockSummaries
from psa_jax.config import IMPLS, DenseConfig, PSAConfig, TopKConfig, check_tau


def resolve_impl(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "xla"
  return impl


def _concrete(x) -> np.ndarray | None:
  """The value of x if it is known at trace time, else None."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _validate(q, k_pages, v_pages, block_table, lengths, summaries) -> None:
  """Shape checks always; value checks when the values are known (outside jit)."""
  if q.ndim != 3:
    raise ValueError(f"q must be [batch, q_heads, head_dim], got shape {q.shape}")
  if k_pages.ndim != 4:
    raise ValueError(f"k_pages must be [kv_heads, num_pages, block_size, head_dim], got shape {k_pages.shape}")
  if v_pages.shape != k_pages.shape:
    raise ValueError(f"v_pages shape {v_pages.shape} differs from k_pages shape {k_pages.shape}")
  if v_pages.dtype != k_pages.dtype:
    raise ValueError(f"v_pages dtype {v_pages.dtype} differs from k_pages dtype {k_pages.dtype}")
  if not (jnp.issubdtype(k_pages.dtype, jnp.floating) or storage.is_packed(k_pages.dtype)):
    raise ValueError(f"pages must be a float dtype or uint16 (packed bfloat16), got {k_pages.dtype}")
  batch, q_heads, head_dim = q.shape
  kv_heads, num_pages, block_size, page_dim = k_pages.shape
  if page_dim != head_dim:
    raise ValueError(f"head_dim of q ({head_dim}) differs from the pages' ({page_dim})")
  if q_heads % kv_heads:
    raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
  if block_table.ndim != 2 or block_table.shape[0] != batch:
    raise ValueError(f"block_table must be [batch={batch}, max_blocks], got shape {block_table.shape}")
  if lengths.shape != (batch,):
    raise ValueError(f"lengths must be [batch={batch}], got shape {lengths.shape}")
  for name, x in (("block_table", block_table), ("lengths", lengths)):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} must be integer, got {x.dtype}")
  if summaries is not None:
    for name, x in zip(BlockSummaries._fields, summaries):
      if x.shape != (kv_heads, num_pages, head_dim):
        raise ValueError(f"summaries.{name} must be {(kv_heads, num_pages, head_dim)}, got {x.shape}")
      if storage.is_packed(x.dtype) != storage.is_packed(k_pages.dtype):
        raise ValueError(f"summaries.{name} ({x.dtype}) must be packed exactly when the pages ({k_pages.dtype}) are")
  lens, table = _concrete(lengths), _concrete(block_table)
  max_len = block_table.shape[1] * block_size
  if lens is not None and ((lens < 0).any() or (lens > max_len).any()):
    raise ValueError(f"lengths must lie in [0, {max_len}] (block table width x block size), got {lens}")
  if lens is not None and table is not None:
    used = np.arange(table.shape[1])[None, :] < ((lens + block_size - 1) // block_size)[:, None]
    bad = used & ((table < 0) | (table >= num_pages))
    if bad.any():
      row, col = np.argwhere(bad)[0]
      raise ValueError(
          f"block_table[{row}, {col}] = {table[row, col]} points outside the pool of {num_pages} pages")


def _pad_axis(x, axis, size):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def _next_pow2(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


@functools.partial(jax.jit, static_argnames=("kind", "config", "impl", "interpret"))
def _decode_attention(q, k_pages, v_pages, block_table, lengths, summaries, tau, *, kind, config, impl,
                      interpret):
  batch, q_heads, head_dim = q.shape
  kv_heads, _, block_size, _ = k_pages.shape
  group = q_heads // kv_heads
  chunk = config.chunk_blocks
  lengths = lengths.astype(jnp.int32)
  block_table = block_table.astype(jnp.int32)
  qg = q.reshape(batch, kv_heads, group, head_dim)

  # Padding: the Triton lowering wants power-of-two tiles and matmuls of at least 16 rows (head_dim: below).
  if impl == "pallas":
    gp = max(16, _next_pow2(group))
    width = max(16, chunk, _next_pow2(block_table.shape[1]))
  else:
    gp = group
    width = -(-block_table.shape[1] // chunk) * chunk
  qg = _pad_axis(qg, 2, gp)
  block_table = _pad_axis(block_table, 1, width)
  if impl == "pallas" and storage.is_packed(k_pages.dtype):
    # Packing is a CPU storage trick; the kernels read bfloat16 (one copy of the pool per call: tests only).
    as_bf16 = lambda x: jax.lax.bitcast_convert_type(x, jnp.bfloat16)
    k_pages, v_pages = as_bf16(k_pages), as_bf16(v_pages)
    summaries = None if summaries is None else BlockSummaries(*map(as_bf16, summaries))
  if impl == "pallas" and _next_pow2(head_dim) != head_dim:
    # Triton tiles are powers of two: zero channels change no logit, block score, value or norm, so the padded
    # call returns the unpadded result. It copies the pool on every call; an arena meant for the Pallas path
    # would store pages padded instead.
    dp = _next_pow2(head_dim)
    qg, k_pages, v_pages = (_pad_axis(x, x.ndim - 1, dp) for x in (qg, k_pages, v_pages))
    summaries = None if summaries is None else BlockSummaries(*(_pad_axis(x, 2, dp) for x in summaries))
  run = functools.partial(_attend, k_pages=k_pages, v_pages=v_pages, block_table=block_table, lengths=lengths,
                          summaries=summaries, kind=kind, config=config, impl=impl, interpret=interpret,
                          group=group, sm_scale=1.0 / math.sqrt(head_dim))
  if impl == "xla" and kind != "dense":
    # One scoring, plan and loop per KV head, each head stopping on its own (see progressive_attention_xla).
    outs, used = zip(*(run(qg[:, h:h + 1], tau[:, h:h + 1], heads=(h,)) for h in range(kv_heads)))
    out, used = jnp.concatenate(outs, axis=1), jnp.concatenate(used, axis=1)
  else:
    out, used = run(qg, tau, heads=None)
  out = out[:, :, :group, :head_dim].reshape(batch, q_heads, head_dim).astype(q.dtype)
  return out, used


def _attend(qg, tau, *, k_pages, v_pages, block_table, lengths, summaries, kind, config, impl, interpret, group,
            heads, sm_scale):
  """Attention of the query groups qg [B, h, Gp, D] against KV heads `heads` of the pool (None: all, h = H), with
  thresholds tau [B, h]. Returns out [B, h, Gp, D] (float32) and blocks used [B, h]."""
  batch = qg.shape[0]
  block_size = k_pages.shape[2]
  chunk = config.chunk_blocks
  plan = None
  if kind != "dense":
    score_kwargs = dict(block_size=block_size, score=config.score, sm_scale=sm_scale)
    if impl == "pallas":
      info = jnp.zeros((batch, progressive.INFO_WIDTH), jnp.int32).at[:, progressive.LENGTH].set(lengths)
      scores = scoring.block_scores_pallas(qg, summaries, block_table, info, interpret=interpret, **score_kwargs)
    else:
      scores = selection.block_scores_reference(qg, summaries, block_table, lengths, heads=heads, **score_kwargs)
    plan = selection.plan_visits(
        scores, lengths, group=group, block_size=block_size, sink_blocks=config.sink_blocks,
        local_blocks=config.local_blocks,
        budget=config.k_blocks if kind == "topk" else config.max_blocks,
        budget_counts_forced=kind == "psa", min_blocks=config.min_blocks if kind == "psa" else 0)
  estimator = config.estimator if kind == "psa" else None
  patience = config.patience if kind == "psa" else 1
  compensate = config.compensate if kind == "psa" else False
  tail = config.tail if kind == "psa" else "last_chunk"

  if impl == "reference":
    if plan is None:
      out = reference.dense_reference(qg, k_pages, v_pages, block_table, lengths, sm_scale=sm_scale)
      used = jnp.broadcast_to(selection.num_blocks(lengths, block_size)[:, None], (batch, qg.shape[1]))
    else:
      out, used = reference.ordered_attention_reference(
          qg, k_pages, v_pages, block_table, lengths, plan, tau, chunk_blocks=chunk, sm_scale=sm_scale,
          estimator=estimator, summaries=summaries, patience=patience, compensate=compensate, tail=tail)
    return out, used
  n = selection.num_blocks(lengths, block_size)
  limit = n if plan is None else plan.limit
  n_forced = jnp.zeros_like(n) if plan is None else plan.n_forced
  info = jnp.stack([lengths, limit, n_forced, jnp.zeros_like(n)], axis=1)
  args = (qg, k_pages, v_pages, block_table,
          None if plan is None else plan.order,
          plan.log_remaining if stopping.needs_log_remaining(estimator, compensate, tail) else None,
          info, tau)
  kwargs = dict(group=group, chunk_blocks=chunk, sm_scale=sm_scale, estimator=estimator, patience=patience,
                compensate=compensate, tail=tail,
                vmean=summaries.vmean if stopping.needs_values(estimator, compensate) else None)
  if impl == "pallas":
    return progressive.progressive_attention_pallas(*args, interpret=interpret, **kwargs)
  return progressive.progressive_attention_xla(*args, heads=heads, **kwargs)


def _run(kind, q, k_pages, v_pages, block_table, lengths, summaries, config, tau, impl, interpret):
  _validate(q, k_pages, v_pages, block_table, lengths, summaries)
  impl = resolve_impl(impl)
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  batch, kv_heads = q.shape[0], k_pages.shape[0]
  tau_value = _concrete(tau)
  if tau_value is not None:  # a traced tau is checked where it was made (config, engine, server)
    for value in np.unique(tau_value):
      check_tau(float(value))
  tau = jnp.asarray(tau, jnp.float32)
  if tau.ndim == 2 and tau.shape != (batch, kv_heads):
    raise ValueError(f"a per-head tau must be [batch, kv_heads] = {(batch, kv_heads)}, got {tau.shape}")
  if tau.ndim > 2 or (tau.ndim == 1 and tau.shape[0] not in (1, batch)):
    raise ValueError(f"tau must be a scalar, [batch] or [batch, kv_heads], got shape {tau.shape}")
  if tau.ndim < 2:
    tau = jnp.broadcast_to(jnp.broadcast_to(tau, (batch,))[:, None], (batch, kv_heads))
  return _decode_attention(q, k_pages, v_pages, block_table, lengths, summaries, tau, kind=kind, config=config,
                           impl=impl, interpret=interpret)


def dense_attention(
    q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_table: jax.Array, lengths: jax.Array,
    config: DenseConfig = DenseConfig(), *, impl: str = "auto", interpret: bool | None = None,
) -> jax.Array:
  """Exact decode attention over every token of each sequence. Returns out [batch, q_heads, head_dim]."""
  out, _ = _run("dense", q, k_pages, v_pages, block_table, lengths, None, config, 1.0, impl, interpret)
  return out


def topk_attention(
    q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_table: jax.Array, lengths: jax.Array,
    summaries: BlockSummaries, config: TopKConfig = TopKConfig(), *, impl: str = "auto",
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Quest-style attention over the sink, local and `config.k_blocks` highest-scoring blocks.

  Returns (out [batch, q_heads, head_dim], blocks_used [batch, kv_heads]).
  """
  return _run("topk", q, k_pages, v_pages, block_table, lengths, summaries, config, 1.0, impl, interpret)


def psa_attention(
    q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_table: jax.Array, lengths: jax.Array,
    summaries: BlockSummaries, config: PSAConfig = PSAConfig(), *, tau: jax.Array | float | None = None,
    impl: str = "auto", interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Progressive Sparse Attention (docs/design.md): blocks in descending estimated criticality, a chunk per
  iteration, until the stopping rule of `config.estimator` holds at `config.patience` chunk boundaries in a row
  (by default: the unread blocks would move the output by at most 1 - tau of its norm) or `config.max_blocks`.

  tau: overrides config.tau; a scalar, [batch] (per-request thresholds) or [batch, kv_heads] (per request and KV
    head: 1.0 reads that head densely), traced values allowed.
  Returns (out [batch, q_heads, head_dim], blocks_used [batch, kv_heads]).
  """
  tau = config.tau if tau is None else tau
  return _run("psa", q, k_pages, v_pages, block_table, lengths, summaries, config, tau, impl, interpret)
