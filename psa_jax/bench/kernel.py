"""Study 1, kernels: decode attention time against context on synthetic inputs shaped like real attention
(a sink, a local window, a few heavy blocks), for dense, top-k and PSA, with each one's output error against
dense. The XLA path on CPU; the Pallas
kernels when a GPU is present (--impl=pallas)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from psa_jax import PSAConfig, TopKConfig, dense_attention, psa_attention, topk_attention
from psa_jax.bench import common
from psa_jax.synthetic import synthetic_decode_inputs


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  contexts: tuple[int, ...] = (1024, 4096, 16384, 65536, 131072)
  attentions: tuple[str, ...] = ("dense", "topk", "psa")
  batch: int = 1
  psa_tau: float = PSAConfig.tau
  topk_blocks: int = 32
  impl: str = "auto"
  repeats: int = 5


def run(config: KernelConfig, out_dir) -> list[dict]:
  rows = []
  for context in config.contexts:
    common.progress(f"context {context}")
    x = synthetic_decode_inputs(0, [context] * config.batch, q_heads=9, kv_heads=3, head_dim=64, heavy_blocks=8,
                                strength=1.5)
    calls = {
        "dense": lambda x: (dense_attention(*x[:5], impl=config.impl), None),
        "topk": lambda x: topk_attention(*x, TopKConfig(k_blocks=config.topk_blocks), impl=config.impl),
        "psa": lambda x: psa_attention(*x, PSAConfig(tau=config.psa_tau), impl=config.impl),
    }
    dense = np.asarray(dense_attention(*x[:5], impl="xla"), np.float32)
    for attention in config.attentions:
      fn = jax.jit(functools.partial(calls[attention]))
      ms = common.median_ms(lambda: fn(x), config.repeats)
      out, used = fn(x)
      blocks = -(-context // 16)
      share = 1.0 if used is None else float(used.mean()) / blocks
      error = np.linalg.norm(np.asarray(out, np.float32) - dense, axis=-1) / np.linalg.norm(dense, axis=-1)
      rows.append({"context": context, "attention": attention, "ms": ms, "kv_share_read": share,
                   "mean_error": float(error.mean())})
      print(common.table(rows[-1:], list(rows[-1])), flush=True)
  print("\n" + common.table(rows, ["context", "attention", "ms", "kv_share_read", "mean_error"]))
  common.save(out_dir, "kernel", rows, {"config": dataclasses.asdict(config)})
  series = {a: ([r["context"] for r in rows if r["attention"] == a], [r["ms"] for r in rows if r["attention"] == a])
            for a in config.attentions}
  common.plot(out_dir / "kernel.png", f"Decode attention ({config.impl}), batch {config.batch}", "context (tokens)",
              "ms per call", series, logx=True, logy=True)
  return rows
