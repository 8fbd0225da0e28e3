"""Tiny real checkpoints written by the real libraries: Hugging Face `save_pretrained` safetensors directories
and GGUF files written with gguf-py's GGUFWriter (llama.cpp's own writer)."""

from __future__ import annotations

import functools
import json
import pathlib

import numpy as np

from psa_jax.models import checkpoint

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@functools.lru_cache(maxsize=1)
def smollm_tokenizer():
  """The default model's tokenizer (vocabulary 49152), to give tiny models a real vocabulary. Read once per
  process: parsing the GGUF's vocabulary takes seconds."""
  _, tok, _ = checkpoint.read_gguf(checkpoint.default_model_path())
  return tok


# A chat template that renders tools and asks for Hermes-format calls, in the manner of Qwen2.5's.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou may call these tools:\n<tools>\n{% for tool in tools %}"
    "{{ tool | tojson }}\n{% endfor %}</tools>\nCall one as <tool_call>\n{\"name\": <name>, \"arguments\": "
    "<object>}\n</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n"
    "</tool_response><|im_end|>\n{% elif m.tool_calls %}<|im_start|>assistant\n{{ m.content }}"
    "{% for call in m.tool_calls %}<tool_call>\n{{ {'name': call.function.name, 'arguments': "
    "call.function.arguments} | tojson }}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_tiny_hf(path: pathlib.Path, arch: str, *, seed: int = 0, rope_scaling: dict | None = None,
                 chat_template: str = CHAT_TEMPLATE, **config_fields):
  """A randomly initialized 2-layer model of `arch` ("llama", "mistral" or "qwen2") saved as safetensors.
  config_fields go to the transformers config (attention_bias, mlp_bias, sliding_window, ...); every bias the
  config asks for is drawn at random, since transformers initializes biases to zero."""
  import torch
  import transformers

  torch.manual_seed(seed)
  common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
  common.update(config_fields)
  if arch in ("llama", "mistral"):
    config_class, model_class = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                 "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[arch]
    config = config_class(rope_theta=10000.0, rope_scaling=rope_scaling, **common)
    model = model_class(config)
    with torch.no_grad():
      for name, param in model.named_parameters():
        if name.endswith(".bias"):
          param.normal_(0, 0.5)
  elif arch == "qwen3":
    config = transformers.Qwen3Config(rope_theta=1000000.0, head_dim=32, rope_scaling=rope_scaling, **common)
    model = transformers.Qwen3ForCausalLM(config)
    with torch.no_grad():  # the per-head norms start at one; make them matter
      for layer in model.model.layers:
        for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
          norm.weight.uniform_(0.5, 1.5)
  else:
    config = transformers.Qwen2Config(rope_theta=1000000.0, **common)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():  # random init leaves biases at zero; make them matter
      for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
          proj.bias.normal_(0, 0.5)
  model = model.float().eval()
  model.save_pretrained(path, safe_serialization=True)
  smollm_tokenizer().backend.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps(
      {"chat_template": chat_template, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
  return model


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (what the loader undoes)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: pathlib.Path, torch_model, *, qtype: str = "F32", arch: str = "llama"):
  """Writes a transformers Llama model as a GGUF file the way llama.cpp's converter does, with its 2-D weights
  quantized to `qtype`. Returns the dequantized weights the file holds, by GGUF tensor name."""
  import gguf

  config = torch_model.config
  tok = smollm_tokenizer()
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(config.num_hidden_layers)
  writer.add_context_length(config.max_position_embeddings)
  writer.add_embedding_length(config.hidden_size)
  writer.add_feed_forward_length(config.intermediate_size)
  writer.add_head_count(config.num_attention_heads)
  writer.add_head_count_kv(config.num_key_value_heads)
  if getattr(config, "head_dim", None):
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
  writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]))
  writer.add_layer_norm_rms_eps(config.rms_norm_eps)
  rope = getattr(config, "rope_scaling", None) or {}
  if rope.get("rope_type") in ("linear", "yarn"):  # as llama.cpp's converter writes them
    writer.add_rope_scaling_type(gguf.RopeScalingType[rope["rope_type"].upper()])
    writer.add_rope_scaling_factor(float(rope["factor"]))
    if rope["rope_type"] == "yarn":
      writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
  writer.add_vocab_size(config.vocab_size)
  writer.add_tokenizer_model("gpt2")
  vocab = tok.backend.get_vocab(with_added_tokens=True)
  tokens = sorted(vocab, key=vocab.get)
  writer.add_token_list(tokens)
  writer.add_token_types([3 if i < 17 else 1 for i in range(len(tokens))])
  model_json = json.loads(tok.backend.to_str())["model"]
  writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in model_json["merges"]])
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_chat_template(CHAT_TEMPLATE)

  names = {
      "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
      "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
      "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
      "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
      "mlp.down_proj.weight": "ffn_down.weight",
      "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
      "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.bias": "attn_output.bias",
      "mlp.gate_proj.bias": "ffn_gate.bias", "mlp.up_proj.bias": "ffn_up.bias", "mlp.down_proj.bias": "ffn_down.bias",
      "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
  }
  stored = {}
  for hf_name, tensor in torch_model.state_dict().items():
    w = tensor.detach().float().numpy()
    if hf_name == "model.embed_tokens.weight":
      name = "token_embd.weight"
    elif hf_name == "model.norm.weight":
      name = "output_norm.weight"
    elif hf_name == "lm_head.weight":
      name = "output.weight"
    else:
      _, _, layer, rest = hf_name.split(".", 3)
      name = f"blk.{layer}.{names[rest]}"
      # Only Llama's q and k are permuted by llama.cpp's converter (it keeps Qwen's in the HF layout).
      if arch == "llama" and rest in ("self_attn.q_proj.weight", "self_attn.q_proj.bias"):
        w = _permute_rope(w, config.num_attention_heads)
      elif arch == "llama" and rest in ("self_attn.k_proj.weight", "self_attn.k_proj.bias"):
        w = _permute_rope(w, config.num_key_value_heads)
    kind = gguf.GGMLQuantizationType[qtype] if w.ndim == 2 else gguf.GGMLQuantizationType.F32
    if kind == gguf.GGMLQuantizationType.F32:
      data = w
    elif kind == gguf.GGMLQuantizationType.F16:
      data = w.astype(np.float16)
    else:
      data = gguf.quants.quantize(w, kind)
    writer.add_tensor(name, data, raw_dtype=kind)
    stored[name] = gguf.quants.dequantize(data, kind) if kind not in (gguf.GGMLQuantizationType.F32,) else w
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return stored


def save_smollm_tokenizer(path: pathlib.Path) -> None:
  """The default model's tokenizer as a Hugging Face tokenizer directory (tokenizer.json and its config), for
  clients that tokenize locally (lm-eval's huggingface tokenizer backend)."""
  tok = smollm_tokenizer()
  path.mkdir(parents=True, exist_ok=True)
  tok.backend.save(str(path / "tokenizer.json"))
  name = lambda i: None if i is None else tok.token(i)
  (path / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": name(tok.eos_token_ids[0]),
      "bos_token": name(tok.bos_token_id), "chat_template": tok.chat_template, "model_max_length": 8192}))


_GROUPS = {"attention": ("kind", "psa_tau", "topk_blocks", "dense_layers", "psa_dense_heads", "impl"),
           "cache": ("kv_memory", "block_size", "kv_dtype", "max_context"),
           "scheduler": ("max_batch", "max_num_batched_tokens", "prefill_chunk", "decode_window", "max_window_seconds",
                         "policy"),
           "parallel": ("mesh", "layer_weights")}


def engine_config(**fields):
  """An EngineConfig from the group fields the tests vary, named as in their groups (attention's `kind` may be
  given as `attention`, the scheduler's `policy` as `scheduler_policy`)."""
  from psa_jax.serving import config as serving_config
  from psa_jax.serving.scheduler import SchedulerConfig

  renamed = {"attention": "kind", "scheduler_policy": "policy"}
  fields = {renamed.get(k, k): v for k, v in fields.items()}
  kinds = {"attention": serving_config.AttentionDefaults, "cache": serving_config.CacheConfig,
           "scheduler": SchedulerConfig, "parallel": serving_config.ParallelConfig}
  groups = {group: kinds[group](**{k: fields.pop(k) for k in names if k in fields})
            for group, names in _GROUPS.items()}
  if fields:
    raise TypeError(f"not engine config fields: {sorted(fields)}")
  return serving_config.EngineConfig(**groups)
