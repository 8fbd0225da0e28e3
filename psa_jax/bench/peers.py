"""Outside peers for study 4, on the same GGUF and machine: Hugging Face transformers (torch, CPU, float32) and
llama.cpp (llama-cpp-python, the GGUF's own Q4_1 weights).

Same protocol as `--study=e2e`: prose prompt of `context` tokens prefilled once (timed: TTFT), then greedy
decode, one warm-up token, `decode_steps` timed. transformers at batch 8 expands the batch-1 cache to 8 rows
(the same prompt, as the e2e study's forks). llama-cpp-python's high-level API decodes one sequence: batch 1
only. Install the peers with `make bench-peers` (never by the test command).
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from psa_jax.models import checkpoint
from psa_jax.bench import common


@dataclasses.dataclass(frozen=True)
class PeersConfig:
  contexts: tuple[int, ...] = (1024, 4096, 8192)
  batches: tuple[int, ...] = (1, 8)
  peers: tuple[str, ...] = ("transformers", "llama.cpp")
  decode_steps: int = 32
  threads: int = os.cpu_count() or 1


def _prompt_ids(tokenizer, context: int, max_context: int, room: int) -> list[int]:
  ids = tokenizer.encode(common.prose(60 * context))
  return ids[: min(context, max_context - room)]


def transformers_rows(config: PeersConfig, path) -> list[dict]:
  import torch
  import transformers

  torch.set_num_threads(config.threads)
  common.progress("transformers: loading the GGUF (dequantizes to float32)")
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, torch_dtype=torch.float32).eval()
  _, tokenizer, _ = checkpoint.read_gguf(path)
  rows = []
  for context in config.contexts:
    ids = _prompt_ids(tokenizer, context, model.config.max_position_embeddings, config.decode_steps + 8)
    with torch.inference_mode():
      start = time.perf_counter()
      out = model(torch.tensor([ids]), use_cache=True)
      ttft = time.perf_counter() - start
      for batch in config.batches:
        common.progress(f"transformers: context {len(ids)}, batch {batch}")
        cache = _copy_cache(out.past_key_values, batch)
        token = out.logits[:, -1].argmax(-1, keepdim=True).repeat(batch, 1)
        position = len(ids)
        timed = 0.0
        for step in range(config.decode_steps + 1):  # the first step warms up
          start = time.perf_counter()
          step_out = model(token, past_key_values=cache, use_cache=True,
                           cache_position=torch.tensor([position]))
          token = step_out.logits[:, -1].argmax(-1, keepdim=True)
          cache, position = step_out.past_key_values, position + 1
          if step:
            timed += time.perf_counter() - start
        rows.append(_row("transformers (torch fp32)", len(ids), batch, timed, config.decode_steps, ttft))
        print(common.table(rows[-1:], list(rows[-1])), flush=True)
  return rows


def _copy_cache(cache, batch: int):
  """An independent copy of a batch-1 cache, repeated to `batch` rows."""
  import copy
  cache = copy.deepcopy(cache)
  if batch > 1:
    cache.batch_repeat_interleave(batch)
  return cache


def llama_cpp_rows(config: PeersConfig, path) -> list[dict]:
  import llama_cpp

  _, tokenizer, _ = checkpoint.read_gguf(path)
  rows = []
  for context in config.contexts:
    if 1 not in config.batches:
      break
    common.progress(f"llama.cpp: context {context}, batch 1")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=context + config.decode_steps + 64, n_threads=config.threads,
                          n_batch=512, verbose=False)
    ids = _prompt_ids(tokenizer, context, 8192, config.decode_steps + 8)
    start = time.perf_counter()
    llm.eval(ids)
    ttft = time.perf_counter() - start
    timed = 0.0
    for step in range(config.decode_steps + 1):
      # The high-level API keeps no logits unless logits_all; read the last token's from the context.
      token = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))
      start = time.perf_counter()
      llm.eval([token])
      if step:
        timed += time.perf_counter() - start
    rows.append(_row(f"llama.cpp {llama_cpp.__version__} (GGUF Q4_1)", len(ids), 1, timed, config.decode_steps,
                     ttft))
    print(common.table(rows[-1:], list(rows[-1])), flush=True)
    del llm
  return rows


def _row(peer, context, batch, timed, steps, ttft) -> dict:
  return {"peer": peer, "context": context, "batch": batch, "ms_per_token": 1e3 * timed / steps,
          "tokens_per_s": batch * steps / timed, "ttft_s": ttft, "prefill_tok_per_s": context / ttft}


def run(config: PeersConfig, out_dir) -> list[dict]:
  path = checkpoint.default_model_path()
  rows = []
  if "transformers" in config.peers:
    rows += transformers_rows(config, path)
  if "llama.cpp" in config.peers:
    rows += llama_cpp_rows(config, path)
  columns = ["peer", "context", "batch", "ms_per_token", "tokens_per_s", "ttft_s", "prefill_tok_per_s"]
  print("\n" + common.table(rows, columns))
  common.save(out_dir, "peers", rows, {"config": dataclasses.asdict(config)})
  for batch in config.batches:
    series = {}
    for r in rows:
      if r["batch"] == batch:
        xs, ys = series.setdefault(r["peer"], ([], []))
        xs.append(r["context"])
        ys.append(r["tokens_per_s"])
    if series:
      common.plot(out_dir / f"peers_batch{batch}.png", f"Peers' decode throughput, batch {batch}",
                  "context (tokens)", "tokens / s", series, logx=True)
  return rows
