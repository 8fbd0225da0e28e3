"""Study 2, attention fidelity on real activations.

The default model reads real text that every machine has offline (the pydoc topics' English prose, and the
source of Python's argparse module); its post-RoPE queries, keys and values are captured in every layer. For a
few query positions near the end, in every layer and head, PSA at several tau, top-k at several k and the
Twilight-style top-p baseline at several p each attend over the captured KV; we report each one's output error
against dense attention and the share of KV blocks it read, and the blocks each needs to reach a given error.
"""

from __future__ import annotations

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np

from psa_jax.models import checkpoint
from psa_jax.models.kv_pages import PagedKV
from psa_jax.pallas_kernels.summaries import BlockSummaries, update_summaries
from psa_jax import PSAConfig, TopKConfig, dense_attention, psa_attention, topk_attention
from psa_jax.bench import common


@dataclasses.dataclass(frozen=True)
class FidelityConfig:
  model: str | None = None
  context: int = 4096
  query_offsets: tuple[int, ...] = (0, 100, 300, 700)  # queries at context - 1 - offset
  texts: tuple[str, ...] = ("prose", "code")
  taus: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
  ks: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128)
  ps: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
  target_errors: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2)
  block_size: int = 16


def _text(kind: str, n_chars: int) -> str:
  if kind == "prose":
    return common.prose(n_chars)
  import argparse
  source = inspect.getsource(argparse)
  return (source * (1 + n_chars // len(source)))[:n_chars]


def capture(lm, ids: list[int], block_size: int):
  """Every layer's post-RoPE q [L, T, Hq, D], k, v [L, T, H, D] over `ids` (float32)."""
  c = lm.model.config
  t = len(ids)
  width = -(-t // block_size)
  kv = PagedKV.zeros(c.num_kv_heads, width, block_size, c.head_dim, lm.model.dtype)
  tables = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (c.num_layers, 1, width))  # layers may overwrite
  fn = jax.jit(lambda tokens: lm.model.prefill(tokens, jnp.zeros(1, jnp.int32), jnp.array([t]), kv, tables,
                                                collect_qkv=True)[2])
  q, k, v = fn(jnp.asarray([ids]))
  return q[:, 0], k[:, 0], v[:, 0]


def paged_inputs(q, k, v, positions, block_size):
  """One batch entry per (layer, query position); each layer's keys become its own run of pages."""
  layers, t, kv_heads, d = k.shape
  width = -(-t // block_size)
  pad = width * block_size - t
  pages = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(layers, width, block_size, kv_heads, d) \
      .transpose(3, 0, 1, 2, 4).reshape(kv_heads, layers * width, block_size, d)
  k_pages, v_pages = pages(k), pages(v)
  tables = jnp.asarray(np.repeat(np.arange(layers * width).reshape(layers, 1, width), len(positions), 1)
                       .reshape(-1, width), jnp.int32)
  lengths = jnp.asarray(np.tile(np.asarray(positions) + 1, layers), jnp.int32)
  queries = q[:, jnp.asarray(positions)].reshape(layers * len(positions), *q.shape[2:])
  counts = np.clip(np.asarray(lengths)[:, None] - np.arange(width)[None] * block_size, 0, block_size)
  summaries = update_summaries(BlockSummaries.zeros(kv_heads, layers * width, d, k.dtype), k_pages, v_pages,
                               tables.reshape(-1), jnp.asarray(counts.reshape(-1)))
  return queries, k_pages, v_pages, tables, lengths, summaries


def run(config: FidelityConfig, out_dir) -> list[dict]:
  common.progress(f"loading {config.model or checkpoint.DEFAULT_MODEL}")
  lm = checkpoint.load(config.model, dtype=jnp.float32)
  rows = []
  for text in config.texts:
    ids = lm.tokenizer.encode(_text(text, 8 * config.context))[: config.context]
    common.progress(f"capturing q/k/v of {len(ids)} tokens of {text}")
    q, k, v = capture(lm, ids, config.block_size)
    positions = [config.context - 1 - o for o in config.query_offsets]
    x = paged_inputs(q, k, v, positions, config.block_size)
    n_blocks = np.repeat(-(-np.asarray(x[4]) // config.block_size), 1)[:, None]  # [B, 1]
    dense = np.asarray(dense_attention(*x[:5], impl="xla"))

    def record(method, setting, out, used):
      err = np.linalg.norm(np.asarray(out) - dense, axis=-1) / np.linalg.norm(dense, axis=-1)  # [B, Hq]
      share = np.asarray(used) / n_blocks  # [B, H]
      rows.append({"text": text, "method": method, "setting": setting, "mean_error": float(err.mean()),
                   "p95_error": float(np.percentile(err, 95)), "mean_block_share": float(share.mean()),
                   "mean_blocks": float(np.asarray(used).mean()),
                   "layer_share": share.reshape(q.shape[0], len(positions), -1).mean(axis=(1, 2)).tolist()})

    common.progress(f"{text}: sweeping PSA, top-k and top-p")
    for tau in config.taus:
      for score in ("mean", "minmax"):
        for estimator in ("score_mass", "last_chunk"):
          out, used = psa_attention(*x, PSAConfig(tau=tau, estimator=estimator, score=score), impl="xla")
          record(f"psa_{score}_{estimator}", tau, out, used)
    for kk in config.ks:
      out, used = topk_attention(*x, TopKConfig(k_blocks=kk), impl="xla")
      record("topk_quest", kk, out, used)
    for p in config.ps:
      out, used = psa_attention(*x, PSAConfig(tau=p, estimator="estimate", chunk_blocks=1), impl="xla")
      record("topp_twilight", p, out, used)
  columns = ["text", "method", "setting", "mean_error", "p95_error", "mean_block_share", "mean_blocks"]
  print("\n" + common.table(rows, columns))
  summary = equal_error_table(rows, config.target_errors)
  print("\nKV block share needed to reach a mean relative output error (lowest over the sweep):")
  print(common.table(summary, list(summary[0])))
  common.save(out_dir, "fidelity", rows, {"config": dataclasses.asdict(config), "equal_error": summary})
  for text in config.texts:
    methods = sorted({r["method"] for r in rows})
    series = {m: ([r["mean_block_share"] for r in rows if r["method"] == m and r["text"] == text],
                  [max(r["mean_error"], 1e-6) for r in rows if r["method"] == m and r["text"] == text])
              for m in methods}
    common.plot(out_dir / f"fidelity_{text}.png", f"Output error vs KV read, {text}, {config.context} tokens",
                "share of KV blocks read", "mean relative error vs dense", series, logy=True)
  return rows


def equal_error_table(rows, targets):
  out = []
  for text in sorted({r["text"] for r in rows}):
    for target in targets:
      entry = {"text": text, "target_error": target}
      for method in sorted({r["method"] for r in rows}):
        ok = [r["mean_block_share"] for r in rows
              if r["text"] == text and r["method"] == method and r["mean_error"] <= target]
        entry[method] = round(min(ok), 4) if ok else None
      out.append(entry)
  return out
