"""Host memory while loading a checkpoint: the peak resident set of a process that runs `checkpoint.load`,
against the bytes of the parameters it ends with.

Each load runs in a child process of its own, which reports its resident set after its imports, its peak
(`VmHWM`) once the parameters are on the device, and those parameters' bytes. Measured for the default
model and for two synthetic checkpoints of a 1B-parameter shape (Llama 3.2 1B's layers, with the default
model's 49152-token vocabulary so that a real tokenizer comes with them), written once into `work_dir`: a GGUF
file of Q8_0 weights, as llama.cpp users hold them, and a Hugging Face directory of bfloat16 safetensors. The
parameter cache is off, so every load converts. On CPU the engine later gives each layer's weights arrays of
their own (`split_layers`), a second copy of the layer weights: each child makes it after the load and reports
the peak with it too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

from psa_jax.bench import common
from psa_jax.models import checkpoint

# Llama 3.2 1B's shape, tied embeddings, the default model's vocabulary.
SHAPE = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
             intermediate_size=8192, vocab_size=49152)

_CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp
from flax import nnx
from psa_jax.models import checkpoint

def status(field):  # bytes; VmHWM is the peak of this program's own memory (ru_maxrss survives the exec)
  for line in open("/proc/self/status"):
    if line.startswith(field + ":"):
      return int(line.split()[1]) * 1024

rss = lambda: status("VmRSS")

base = rss()
began = time.perf_counter()
lm = checkpoint.load(sys.argv[1], dtype=jnp.dtype(sys.argv[2]), use_cache=False)
state = nnx.state(lm.model)
jax.block_until_ready(state)
params = sum(x.nbytes for x in jax.tree.leaves(state))
peak = status("VmHWM")
seconds = time.perf_counter() - began
jax.block_until_ready(lm.model.split_layers())  # what the engine does on CPU
split = status("VmHWM")
print(json.dumps({"base_rss": base, "peak_rss": peak, "split_rss": split, "param_bytes": params,
                  "seconds": seconds}))
"""


@dataclasses.dataclass(frozen=True)
class LoadingConfig:
  model: str | None = None  # the checkpoint measured beside the synthetic ones (None: the default model)
  synthetic: tuple[str, ...] = ("gguf", "safetensors")
  dtypes: tuple[str, ...] = ("float32", "bfloat16")
  work_dir: str | None = None  # where the synthetic checkpoints go (None: out_dir/checkpoints)
  shape: dict = dataclasses.field(default_factory=lambda: dict(SHAPE))  # of the synthetic checkpoints
  seed: int = 0


def _hf_config(shape: dict) -> dict:
  return dict(model_type="llama", architectures=["LlamaForCausalLM"], max_position_embeddings=8192,
              rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
              torch_dtype="bfloat16", **shape)


def _weights(shape: dict, rng: np.random.Generator):
  """(HF name, float32 array) of a random model of `shape`, one tensor at a time."""
  e, f, l = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
  d = e // shape["num_attention_heads"]
  kv = shape["num_key_value_heads"] * d
  normal = lambda *s: rng.standard_normal(s, dtype=np.float32) * np.float32(0.02)
  yield "model.embed_tokens.weight", normal(shape["vocab_size"], e)
  for i in range(l):
    p = f"model.layers.{i}."
    yield p + "input_layernorm.weight", np.ones(e, np.float32)
    yield p + "post_attention_layernorm.weight", np.ones(e, np.float32)
    for name, rows, cols in (("self_attn.q_proj", e, e), ("self_attn.k_proj", kv, e), ("self_attn.v_proj", kv, e),
                             ("self_attn.o_proj", e, e), ("mlp.gate_proj", f, e), ("mlp.up_proj", f, e),
                             ("mlp.down_proj", e, f)):
      yield p + name + ".weight", normal(rows, cols)
  yield "model.norm.weight", np.ones(e, np.float32)


def write_safetensors(path: pathlib.Path, shape: dict, seed: int) -> pathlib.Path:
  import ml_dtypes
  from safetensors.numpy import save_file

  path.mkdir(parents=True, exist_ok=True)
  tensors = {name: w.astype(ml_dtypes.bfloat16) for name, w in _weights(shape, np.random.default_rng(seed))}
  save_file(tensors, str(path / "model.safetensors"))
  (path / "config.json").write_text(json.dumps(_hf_config(shape)))
  _, tok, _ = checkpoint.read_gguf(checkpoint.default_model_path())
  tok.backend.save(str(path / "tokenizer.json"))
  return path


def write_gguf(path: pathlib.Path, shape: dict, seed: int) -> pathlib.Path:
  """A Q8_0 GGUF file of a random Llama of `shape`, with the default model's tokenizer, laid out as llama.cpp's
  converter writes one (q and k rows permuted for its RoPE)."""
  import gguf

  path.parent.mkdir(parents=True, exist_ok=True)
  source = gguf.GGUFReader(str(checkpoint.default_model_path()))
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_block_count(shape["num_hidden_layers"])
  writer.add_context_length(8192)
  writer.add_embedding_length(shape["hidden_size"])
  writer.add_feed_forward_length(shape["intermediate_size"])
  writer.add_head_count(shape["num_attention_heads"])
  writer.add_head_count_kv(shape["num_key_value_heads"])
  writer.add_rope_freq_base(500000.0)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_vocab_size(shape["vocab_size"])
  for key, field in source.fields.items():
    if key.startswith("tokenizer."):
      writer.add_key_value(key, field.contents(), field.types[0], field.types[1] if len(field.types) > 1 else None)
  names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
           "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
           "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
           "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
           "mlp.down_proj.weight": "ffn_down.weight"}
  q8 = gguf.GGMLQuantizationType.Q8_0
  for name, w in _weights(shape, np.random.default_rng(seed)):
    if name == "model.embed_tokens.weight":
      out = "token_embd.weight"
    elif name == "model.norm.weight":
      out = "output_norm.weight"
    else:
      _, _, layer, rest = name.split(".", 3)
      out = f"blk.{layer}.{names[rest]}"  # random weights: the RoPE permutation changes nothing measured here
    if w.ndim == 2:
      writer.add_tensor(out, gguf.quants.quantize(w, q8), raw_dtype=q8)
    else:
      writer.add_tensor(out, w)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def measure(model: str, dtype: str) -> dict:
  """One load in a child process: its resident sets and parameter bytes (see the module docstring)."""
  done = subprocess.run([sys.executable, "-c", _CHILD, model, dtype], capture_output=True, text=True,
                        env={**os.environ, "PSA_JAX_QUIET": "1"})
  if done.returncode:
    raise RuntimeError(f"loading {model} failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def run(config: LoadingConfig, out_dir) -> list[dict]:
  out_dir = pathlib.Path(out_dir)
  work = pathlib.Path(config.work_dir) if config.work_dir else out_dir / "checkpoints"
  models = [(config.model or checkpoint.DEFAULT_MODEL, config.model)]
  if "gguf" in config.synthetic:
    path = work / "llama-synthetic-q8_0.gguf"
    if not path.exists():
      common.progress(f"writing {path}")
      write_gguf(path, config.shape, config.seed)
    models.append(("synthetic GGUF, Q8_0", str(path)))
  if "safetensors" in config.synthetic:
    path = work / "llama-synthetic-bf16"
    if not (path / "model.safetensors").exists():
      common.progress(f"writing {path}")
      write_safetensors(path, config.shape, config.seed)
    models.append(("synthetic safetensors, bfloat16", str(path)))
  rows = []
  for label, model in models:
    for dtype in config.dtypes:
      common.progress(f"loading {label} as {dtype}")
      m = measure(model or checkpoint.DEFAULT_MODEL, dtype)
      gib = lambda x: x / 2**30
      rows.append({"checkpoint": label, "dtype": dtype, "params_gib": gib(m["param_bytes"]),
                   "base_rss_gib": gib(m["base_rss"]), "peak_rss_gib": gib(m["peak_rss"]),
                   "peak_over_params": m["peak_rss"] / m["param_bytes"],
                   "load_over_params": (m["peak_rss"] - m["base_rss"]) / m["param_bytes"],
                   "split_over_params": m["split_rss"] / m["param_bytes"],
                   "seconds": m["seconds"]})
      print(common.table(rows[-1:], list(rows[-1])), flush=True)
  print("\n" + common.table(rows, list(rows[0])))
  path = common.save(out_dir, "loading", rows, {"shape": config.shape})
  common.progress(f"wrote {path}")
  return rows
