"""Pallas block scoring: the estimated logit of every KV block for every query head.

Reads only the two summary rows of the score kind's box per block (summaries.score_box), never the keys. The
reference is `selection.block_scores_reference`.

Grid: (sequence, KV head, tile of `blocks_per_tile` blocks of the block table).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from psa_jax.pallas_kernels.progressive import INFO_WIDTH, LENGTH, _dot_t
from psa_jax.pallas_kernels.summaries import BlockSummaries, score_box


def _kernel(q_ref, table_ref, info_ref, lower_ref, upper_ref, out_ref, *, block_size, sm_scale):
  tile = table_ref.shape[0]
  block = pl.program_id(2) * tile + jnp.arange(tile)
  valid = block < (info_ref[LENGTH] + block_size - 1) // block_size
  pages = jnp.where(valid, table_ref[...], 0)
  q = q_ref[...].astype(jnp.float32)
  # q+ . upper + q- . lower: the bound over the score kind's box (summaries.score_box).
  s = (_dot_t(jnp.maximum(q, 0.0), upper_ref[pages].astype(jnp.float32))
       + _dot_t(jnp.minimum(q, 0.0), lower_ref[pages].astype(jnp.float32)))
  out_ref[...] = jnp.where(valid[None, :], s * sm_scale, float("-inf"))


def block_scores_pallas(
    q: jax.Array,  # [B, H, Gp, D]
    summaries: BlockSummaries,  # each [H, P, D]
    block_table: jax.Array,  # [B, M], M a multiple of blocks_per_tile
    info: jax.Array,  # [B, INFO_WIDTH]
    *,
    block_size: int,
    score: str,
    sm_scale: float,
    interpret: bool,
    blocks_per_tile: int = 64,
    num_warps: int = 4,
) -> jax.Array:
  """Returns scores [B, H, Gp, M] float32, -inf past each sequence's end."""
  b, h, gp, d = q.shape
  _, p, _ = summaries.kmin.shape
  m = block_table.shape[1]
  tile = min(blocks_per_tile, m)
  if m % tile:
    raise ValueError(f"block table width {m} is not a multiple of the scoring tile {tile}")
  summary_spec = pl.BlockSpec((None, p, d), lambda i, j, t: (j, 0, 0))
  box = score_box(summaries, score)
  return pl.pallas_call(
      functools.partial(_kernel, block_size=block_size, sm_scale=sm_scale),
      grid=(b, h, m // tile),
      in_specs=[
          pl.BlockSpec((None, None, gp, d), lambda i, j, t: (i, j, 0, 0)),
          pl.BlockSpec((None, tile), lambda i, j, t: (i, t)),
          pl.BlockSpec((None, INFO_WIDTH), lambda i, j, t: (i, 0)),
          summary_spec,
          summary_spec,
      ],
      out_specs=pl.BlockSpec((None, None, gp, tile), lambda i, j, t: (i, j, 0, t)),
      out_shape=jax.ShapeDtypeStruct((b, h, gp, m), jnp.float32),
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=2),
      interpret=interpret,
      name=f"block_scores_{score}",
  )(q, block_table, info, *box)
