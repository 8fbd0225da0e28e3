"""`python -m psa_jax.bench --study=...`: the benchmark studies. Flags become frozen configs at once.

  --study=e2e     decode throughput / latency of the engine, dense vs top-k vs PSA (study 4)
  --study=peers   the same decode measured on transformers and llama.cpp (study 4's peers; `make bench-peers`)
  --study=kernel  decode attention time against context on synthetic sparse inputs (study 1)
  --study=fidelity  output error against KV blocks read on the default model's real q/k/v (study 2)
  --study=tasks     retrieval accuracy and perplexity against KV blocks read (study 3)
  --study=quality   KL to dense, top-1 agreement and needle retrieval against KV blocks read: PSA against top-k
  --study=retrieval whole-answer needle retrieval on chat prompts (RULER's kinds, 0-100% depths), each method
                    paired item by item against dense (Wilson intervals, McNemar)
  --study=heads     the (layer, KV head) pairs PSA should read densely, found on needle-free text
  --study=sharding  decode tokens/s against device count on meshes (--host_devices forces CPU devices)
  --study=serving   a real server under load over HTTP, like `vllm bench serve`: TTFT, TPOT, ITL, E2E latency and
                    throughput at fixed concurrencies and Poisson request rates, per attention and scheduler
  --study=startup   seconds to ready and to the first answer, cold (empty compilation cache) and warm (restart)
  --study=loading   peak host memory while loading a checkpoint, against its parameters' bytes
Results: a table on stdout, a JSON file and PNG plots in --out_dir.
"""

from __future__ import annotations

import pathlib

from absl import app, flags, logging

from psa_jax import common_flags as shared
from psa_jax.config import PSAConfig
from psa_jax.bench import (e2e, fidelity, heads, kernel, loading, peers, quality, retrieval, serving, sharding, startup,
                           tasks)

_STUDY = flags.DEFINE_enum("study", "e2e",
                           ["e2e", "peers", "kernel", "fidelity", "tasks", "quality", "retrieval", "heads", "sharding",
                            "serving", "startup", "loading"],
                           "Which study to run.")
_OUT = flags.DEFINE_string("out_dir", "bench_results", "Where JSON results and PNG plots go.")
_CONTEXTS = flags.DEFINE_list("contexts", None, "Context lengths (tokens).")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes (e2e).")
_ATTENTIONS = flags.DEFINE_list("attentions", ["dense", "topk", "psa"], "Attention kinds to compare.")
_DECODE_STEPS = flags.DEFINE_integer(
    "decode_steps", 64,
    "Timed decode tokens per sequence (e2e and sharding: whole windows, a row reports the median window; peers).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats per point (kernel).")
_SAMPLES = flags.DEFINE_integer("samples", 2, "Prompts per task and context (tasks).")
_PPL_CONTEXT = flags.DEFINE_integer("ppl_context", 4096, "Tokens of prose for the perplexity run (tasks).")
_DOCUMENTS = flags.DEFINE_list("documents", [], "Text files to score (quality) or to hide needles in (retrieval); "
                               "default: Python stdlib texts.")
_POSITIONS = flags.DEFINE_integer("positions", 256, "Scored positions per document and context (quality).")
_FULL = flags.DEFINE_bool("full", False, "Finer budget grid (quality; takes longer).")
_QUALITY_TAUS = flags.DEFINE_list("quality_taus", None, "PSA thresholds of the PSA curves (quality; default grid) "
                                  "or of the PSA methods (retrieval; default: the default tau and 0.95).")
_QUALITY_KS = flags.DEFINE_list("quality_ks", None, "Top-k budgets of the top-k curves (quality; default grid) "
                                "or methods (retrieval; default: 32, 64; empty: none).")
_HEADS_SHARE = flags.DEFINE_float("heads_share", heads.HeadsConfig.share,
                                  "Share of the model's KV heads PSA reads densely (heads).")
_RETRIEVAL_KINDS = flags.DEFINE_list("retrieval_kinds", list(retrieval.KINDS), "Needle kinds (retrieval).")
_ITEMS = flags.DEFINE_integer("items", retrieval.RetrievalConfig.items, "Items per context and kind (retrieval).")
_CURVES = flags.DEFINE_list("curves", list(quality.DEFAULT_FAMILIES),
                            f"Which method curves to score (quality), of {', '.join(quality.FAMILIES)}.")
_QUESTIONS = flags.DEFINE_integer("needle_questions", 24, "Questions per needle task and context (quality).")
_NEEDLE_TASKS = flags.DEFINE_list("needle_tasks", list(quality.NEEDLE_TASKS), "Needle tasks (quality).")
_PEERS = flags.DEFINE_list("peers", list(peers.PeersConfig.peers), "Peers to measure (peers).")
_MESHES = flags.DEFINE_list("meshes", list(sharding.ShardingConfig.meshes),
                            "Meshes to compare (sharding): 'none' or 'data=N,model=M'.")
_CONCURRENCIES = flags.DEFINE_list("concurrencies", [str(c) for c in serving.ServingConfig.concurrencies],
                                   "Requests in flight, one closed-loop level each (serving).")
_RATES = flags.DEFINE_list("request_rates", [], "Poisson arrival rates in requests/s, one level each (serving).")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", serving.ServingConfig.num_prompts, "Requests per level (serving).")
_PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", serving.ServingConfig.prompt_tokens,
                                      "Prompt length in tokens (serving).")
_OUTPUT_TOKENS = flags.DEFINE_integer("output_tokens", serving.ServingConfig.output_tokens,
                                      "Tokens generated per request (serving).")
_SCHEDULERS = flags.DEFINE_list("schedulers", list(serving.ServingConfig.schedulers),
                                "The servers' --scheduler values, one server each (serving); empty: no --scheduler.")
_SERVER_FLAGS = flags.DEFINE_list(
    "server_flags", [], "Flags for every server (serving), e.g. --server_flags=--max_context=2048,--max_batch=16; "
    "quote one that holds a comma: '--server_flags=\"--mesh=data=2,model=4\"'.")
_HOST_DEVICES = flags.DEFINE_integer("host_devices", None, "Force this many CPU devices (sharding; CPU only).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-host: host:port of process 0; every process runs the same command.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax and XLA are chatty at INFO
  out = pathlib.Path(_OUT.value)
  contexts = tuple(int(x) for x in _CONTEXTS.value) if _CONTEXTS.value else None
  if _HOST_DEVICES.value:
    import jax
    jax.config.update("jax_num_cpu_devices", _HOST_DEVICES.value)  # before the backend starts
  if _COORDINATOR.value:
    from psa_jax.models.parallel import initialize_distributed
    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if _STUDY.value == "e2e":
    config = e2e.E2EConfig(
        model=shared.MODEL.value, contexts=contexts or e2e.E2EConfig.contexts,
        batches=tuple(int(x) for x in _BATCHES.value), attentions=tuple(_ATTENTIONS.value),
        decode_steps=_DECODE_STEPS.value, psa_tau=shared.PSA_TAU.value, psa_dense_heads=shared.dense_heads(),
        topk_blocks=shared.TOPK_BLOCKS.value,
        dtype=shared.weights_dtype(), weights=shared.WEIGHTS.value, kv_dtype=shared.KV_DTYPE.value)
    e2e.run(config, out)
  elif _STUDY.value == "peers":
    config = peers.PeersConfig(contexts=contexts or peers.PeersConfig.contexts,
                               batches=tuple(int(x) for x in _BATCHES.value), peers=tuple(_PEERS.value),
                               decode_steps=_DECODE_STEPS.value)
    peers.run(config, out)
  elif _STUDY.value == "tasks":
    config = tasks.TasksConfig(model=shared.MODEL.value, contexts=contexts or tasks.TasksConfig.contexts,
                               samples=_SAMPLES.value, ppl_context=_PPL_CONTEXT.value, kv_dtype=shared.KV_DTYPE.value)
    tasks.run(config, out)
  elif _STUDY.value == "quality":
    config = quality.QualityConfig(
        model=shared.MODEL.value, documents=tuple(_DOCUMENTS.value),
        contexts=contexts or quality.QualityConfig.contexts,
        positions=_POSITIONS.value, dense_layers=shared.DENSE_LAYERS.value, dense_heads=shared.dense_heads(),
        methods=quality.default_methods(
            _FULL.value, taus=tuple(float(t) for t in _QUALITY_TAUS.value) if _QUALITY_TAUS.value else None,
            ks=tuple(int(k) for k in _QUALITY_KS.value) if _QUALITY_KS.value else None, families=tuple(_CURVES.value)),
        needle_tasks=tuple(_NEEDLE_TASKS.value), needle_questions=_QUESTIONS.value)
    quality.run(config, out)
  elif _STUDY.value == "retrieval":
    methods = retrieval.default_methods(
        **({"taus": tuple(float(t) for t in _QUALITY_TAUS.value)} if _QUALITY_TAUS.value else {}),
        **({"ks": tuple(int(k) for k in _QUALITY_KS.value)} if _QUALITY_KS.value is not None else {}),
        dense_heads=shared.dense_heads())
    config = retrieval.RetrievalConfig(
        model=shared.MODEL.value, contexts=contexts or retrieval.RetrievalConfig.contexts,
        kinds=tuple(_RETRIEVAL_KINDS.value), items=_ITEMS.value, methods=methods, documents=tuple(_DOCUMENTS.value),
        kv_dtype=shared.KV_DTYPE.value)
    retrieval.run(config, out)
  elif _STUDY.value == "heads":
    config = heads.HeadsConfig(model=shared.MODEL.value, documents=tuple(_DOCUMENTS.value),
                               context=int(contexts[0]) if contexts else heads.HeadsConfig.context,
                               positions=_POSITIONS.value if _POSITIONS.present else heads.HeadsConfig.positions,
                               share=_HEADS_SHARE.value, psa=PSAConfig(tau=shared.PSA_TAU.value))
    heads.run(config, out)
  elif _STUDY.value == "sharding":
    config = sharding.ShardingConfig(
        model=shared.MODEL.value, meshes=tuple(_MESHES.value), context=int(contexts[0]) if contexts else 1024,
        batch=int(_BATCHES.value[-1]),
        attentions=tuple(_ATTENTIONS.value) if _ATTENTIONS.present else sharding.ShardingConfig.attentions,
        decode_steps=_DECODE_STEPS.value, psa_tau=shared.PSA_TAU.value, psa_dense_heads=shared.dense_heads())
    sharding.run(config, out)
  elif _STUDY.value == "serving":
    config = serving.ServingConfig(
        model=shared.MODEL.value, attentions=tuple(_ATTENTIONS.value), schedulers=tuple(_SCHEDULERS.value),
        concurrencies=tuple(int(c) for c in _CONCURRENCIES.value),
        request_rates=tuple(float(r) for r in _RATES.value), num_prompts=_NUM_PROMPTS.value,
        prompt_tokens=_PROMPT_TOKENS.value, output_tokens=_OUTPUT_TOKENS.value, server_flags=tuple(_SERVER_FLAGS.value))
    serving.run(config, out)
  elif _STUDY.value == "loading":
    loading.run(loading.LoadingConfig(model=shared.MODEL.value), out)
  elif _STUDY.value == "startup":
    startup.run(startup.StartupConfig(model=shared.MODEL.value, server_flags=tuple(_SERVER_FLAGS.value)), out)
  elif _STUDY.value == "fidelity":
    config = fidelity.FidelityConfig(model=shared.MODEL.value, context=int(contexts[0]) if contexts else 4096)
    fidelity.run(config, out)
  else:
    config = kernel.KernelConfig(
        contexts=contexts or kernel.KernelConfig.contexts, attentions=tuple(_ATTENTIONS.value),
        psa_tau=shared.PSA_TAU.value,
        topk_blocks=shared.TOPK_BLOCKS.value, impl=shared.IMPL.value, repeats=_REPEATS.value)
    kernel.run(config, out)


if __name__ == "__main__":
  app.run(main)
