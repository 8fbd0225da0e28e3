"""Sharded decode throughput against device count: the default model served on meshes of 1 to 8
devices, dense and PSA, batch 8, from one prefilled context per mesh.

On a CPU the devices are forced host devices (`jax_num_cpu_devices`) that share the machine's cores, so the
figures show what sharding costs in collectives and partitioning, not what more chips would buy. On a GPU host
the meshes use real devices.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from psa_jax.models import checkpoint, parallel
from psa_jax.bench import common
from psa_jax.config import PSAConfig
from psa_jax.bench.e2e import prefill_and_hold, timed_decode
from psa_jax.serving.config import AttentionDefaults, CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from psa_jax.serving.engine import Engine


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
  model: str | None = None
  meshes: tuple[str, ...] = ("none", "data=2", "model=3", "data=4", "data=2,model=3", "data=8")
  context: int = 1024
  batch: int = 8
  attentions: tuple[str, ...] = ("dense", "psa")
  decode_steps: int = 32
  decode_window: int = 16
  psa_tau: float = PSAConfig.tau
  psa_dense_heads: tuple[tuple[int, int], ...] = ()  # AttentionDefaults.psa_dense_heads


def run(config: ShardingConfig, out_dir) -> list[dict]:
  common.progress(f"loading {config.model or checkpoint.DEFAULT_MODEL}; {len(jax.devices())} devices")
  lm = checkpoint.load(config.model, dtype=jnp.float32)
  c = lm.model.config
  prompt = lm.tokenizer.encode(common.prose(8 * config.context))[: config.context]
  extra = 3 * config.decode_window + config.decode_steps + 16
  rows = []
  for mesh in config.meshes:
    mesh_config = parallel.MeshConfig() if mesh == "none" else parallel.MeshConfig.parse(mesh)
    if mesh_config.size > len(jax.devices()):
      common.progress(f"skipping mesh {mesh}: {len(jax.devices())} devices")
      continue
    blocks = -(-(len(prompt) + extra) // 16) + 1
    engine = Engine(nnx.clone(lm.model), lm.tokenizer, EngineConfig(
        attention=AttentionDefaults(kind="dense", psa_tau=config.psa_tau, psa_dense_heads=config.psa_dense_heads),
        cache=CacheConfig(max_context=c.max_context),
        scheduler=SchedulerConfig(max_batch=config.batch, decode_window=config.decode_window),
        parallel=ParallelConfig(mesh=mesh)), num_pages=c.num_layers * blocks * (config.batch + 1))
    common.progress(f"mesh {mesh}: {parallel.describe(engine.mesh)}; prefilling {len(prompt)} tokens")
    base, ttft = prefill_and_hold(engine, prompt, extra)
    for attention in config.attentions:
      common.progress(f"decoding: mesh {mesh}, {attention}, batch {config.batch}")
      rows.append({"mesh": mesh, "devices": mesh_config.size, "attention": attention, "batch": config.batch,
                   "context": len(prompt), **timed_decode(engine, base, attention, config.batch,
                                                          config.decode_steps), "ttft_s": ttft})
      print(common.table(rows[-1:], list(rows[-1])), flush=True)
    del engine
  columns = ["mesh", "devices", "attention", "batch", "context", "ms_per_token", "tokens_per_s", "kv_share_read",
             "ttft_s"]
  print("\n" + common.table(rows, columns))
  common.save(out_dir, "sharding", rows, {"config": dataclasses.asdict(config), "devices": str(jax.devices())})
  by_kind = {a: ([r["devices"] for r in rows if r["attention"] == a],
                 [r["tokens_per_s"] for r in rows if r["attention"] == a]) for a in config.attentions}
  common.plot(out_dir / "sharding.png", f"Decode throughput against devices, batch {config.batch}, "
              f"context {len(prompt)} ({jax.default_backend()})", "devices in the mesh", "tokens / s", by_kind)
  return rows
