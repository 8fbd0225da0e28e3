"""Study 4, end to end: decode throughput and latency of the serving engine on the default model, dense against
top-k against PSA, at several contexts and batch sizes, in one run.

Each context is prefilled once (timed: TTFT and prefill tokens/s) and held; every (attention, batch) pair then
decodes from copies of that KV (`Engine.fork`), so all pairs see the same cache. Decode is timed window by window
and a row reports the median window: on a shared machine one slow window (another tenant, a page-cache flush)
moved a two-window mean by 5-10%; the fastest and slowest windows are kept beside it.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax.numpy as jnp

from psa_jax.models import checkpoint
from psa_jax.bench import common
from psa_jax.config import PSAConfig
from psa_jax.serving.config import (AttentionDefaults, CacheConfig, EngineConfig, ParallelConfig, SamplingParams,
                                    SchedulerConfig)
from psa_jax.serving.engine import Engine


@dataclasses.dataclass(frozen=True)
class E2EConfig:
  model: str | None = None
  contexts: tuple[int, ...] = (1024, 4096, 8192)
  batches: tuple[int, ...] = (1, 8)
  attentions: tuple[str, ...] = ("dense", "topk", "psa")
  decode_steps: int = 64  # timed tokens per sequence (whole windows), after one warm-up window
  decode_window: int = 16
  psa_tau: float = PSAConfig.tau
  psa_dense_heads: tuple[tuple[int, int], ...] = ()  # AttentionDefaults.psa_dense_heads
  topk_blocks: int = 32
  dtype: str = "float32"
  weights: str = "float"  # or "int8" (psa_jax/models/quantize.py)
  kv_dtype: str = "bfloat16"  # EngineConfig.kv_dtype
  layer_weights: str = "auto"  # EngineConfig.layer_weights
  prefill_chunk: int = 512


def prefill_and_hold(engine: Engine, prompt: list[int], extra: int):
  """Prefills `prompt` and holds it for forks; returns (request, seconds to its first token)."""
  base = engine.submit(prompt, SamplingParams(max_tokens=extra, stop_token_ids=()))
  start = time.perf_counter()
  while base.state != "running":
    engine.step()
  ttft = time.perf_counter() - start
  engine.hold(base)
  return base, ttft


def timed_decode(engine: Engine, base, attention: str, batch: int, decode_steps: int) -> dict:
  """`batch` forks of the held `base` decode `decode_steps` tokens each (rounded up to whole windows) after one
  warm-up window. Returns ms_per_token (per sequence, median window), its fastest and slowest window,
  tokens_per_s (all sequences, at the median) and the KV share read (the mean over the timed windows: PSA's
  varies from window to window with what the sequences attend to)."""
  window = engine.config.scheduler.decode_window
  windows = max(1, -(-decode_steps // window))
  # max_tokens counts the parent's output too: leave room for the warm-up window and the timed windows.
  params = SamplingParams(max_tokens=len(base.output) + window * (windows + 1) + 1, stop_token_ids=())
  forks = engine.fork(base, batch, params, attention=attention)
  engine.step()  # warm-up window (compiles once per shape bucket)
  ms, shares = [], []
  for _ in range(windows):
    if not all(f.state == "running" for f in forks):
      raise RuntimeError("forks finished before the timed windows were done")
    first = engine.counters["generated_tokens"]
    start = time.perf_counter()
    engine.step()
    elapsed = time.perf_counter() - start
    ms.append(1e3 * elapsed / ((engine.counters["generated_tokens"] - first) / batch))
    shares.append(engine.telemetry[-1]["blocks_share"])
  share = statistics.fmean(shares)
  for f in forks:
    engine.cancel(f.id)
  engine.step()
  median = statistics.median(ms)
  return {"ms_per_token": median, "ms_per_token_min": min(ms), "ms_per_token_max": max(ms),
          "tokens_per_s": 1e3 * batch / median, "kv_share_read": share}


def run(config: E2EConfig, out_dir) -> list[dict]:
  common.progress(f"loading {config.model or checkpoint.DEFAULT_MODEL}")
  lm = checkpoint.load(config.model, dtype=jnp.dtype(config.dtype))
  model = lm.model
  if config.weights == "int8":
    from psa_jax.models.quantize import quantize_int8
    model = quantize_int8(model)
  c = model.config
  extra = 3 * config.decode_window + config.decode_steps + 16  # tokens decoded on top of a context
  longest = min(max(config.contexts) + extra, c.max_context)
  blocks = -(-longest // 16) + 1
  num_pages = c.num_layers * blocks * (max(config.batches) + 1)
  engine = Engine(model, lm.tokenizer, EngineConfig(
      attention=AttentionDefaults(kind="dense", psa_tau=config.psa_tau, topk_blocks=config.topk_blocks,
                                  psa_dense_heads=config.psa_dense_heads),
      cache=CacheConfig(kv_dtype=config.kv_dtype, max_context=c.max_context),
      scheduler=SchedulerConfig(max_batch=max(config.batches), decode_window=config.decode_window,
                                prefill_chunk=config.prefill_chunk),
      parallel=ParallelConfig(layer_weights=config.layer_weights)), num_pages=num_pages)
  layer_weights = "split" if engine.splits_layers else "stacked"
  text_ids = lm.tokenizer.encode(common.prose(60 * max(config.contexts)))
  rows = []
  for context in config.contexts:
    prompt = text_ids[: min(context, c.max_context - extra)]  # the model's full context leaves room to decode
    common.progress(f"prefilling {len(prompt)} tokens")
    base, ttft = prefill_and_hold(engine, prompt, extra)
    for attention in config.attentions:
      for batch in config.batches:
        common.progress(f"decoding: context {context}, {attention}, batch {batch}")
        rows.append({"weights": config.weights, "kv": config.kv_dtype, "layers": layer_weights, "context": context,
                     "attention": attention, "batch": batch,
                     **timed_decode(engine, base, attention, batch, config.decode_steps),
                     "ttft_s": ttft, "prefill_tok_per_s": len(prompt) / ttft})
        print(common.table(rows[-1:], list(rows[-1])), flush=True)
    engine.cancel(base.id)
    engine.step()
  columns = ["weights", "kv", "layers", "context", "batch", "attention", "ms_per_token", "ms_per_token_min",
             "ms_per_token_max", "tokens_per_s", "kv_share_read", "ttft_s", "prefill_tok_per_s"]
  print("\n" + common.table(rows, columns))
  common.save(out_dir, f"e2e_{config.weights}", rows, {"config": dataclasses.asdict(config)})
  for batch in config.batches:
    series = {a: ([r["context"] for r in rows if r["attention"] == a and r["batch"] == batch],
                  [r["tokens_per_s"] for r in rows if r["attention"] == a and r["batch"] == batch])
              for a in config.attentions}
    common.plot(out_dir / f"e2e_{config.weights}_batch{batch}.png",
                f"Decode throughput, batch {batch}, {config.weights} weights, {config.kv_dtype} KV",
                "context (tokens)", "tokens / s", series, logx=True)
  return rows
