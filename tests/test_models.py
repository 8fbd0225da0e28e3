"""The decoder on real checkpoints, against Hugging Face transformers (torch on CPU)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch  # the [peers] extra, which `make test` installs
import transformers

from psa_jax.models import checkpoint
from psa_jax.models.generate import generate
from psa_jax.models.kv_pages import PagedKV
from psa_jax import AttentionBackend

from tests import tiny_models



def prose(n_chars: int) -> str:
  from pydoc_data import topics
  return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))[:n_chars]


def hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor([ids])).logits[0].float().numpy()


def our_logits(decoder, ids, attention=None, decode_last=0):
  """Last-position logits from a prefill of ids[:-decode_last] then `decode_last` decode steps."""
  c = decoder.config
  n_prefill = len(ids) - decode_last
  width = -(-len(ids) // 16)
  kv = PagedKV.zeros(c.num_kv_heads, c.num_layers * width, 16, c.head_dim, decoder.dtype)
  tables = jnp.arange(c.num_layers * width, dtype=jnp.int32).reshape(c.num_layers, 1, width)
  x, kv = decoder.prefill(jnp.asarray([ids[:n_prefill]]), jnp.zeros(1, jnp.int32), jnp.array([n_prefill]), kv,
                          tables)
  logits = decoder.logits(x[0, -1])
  for i in range(n_prefill, len(ids)):
    logits, kv, _ = decoder.decode(jnp.array([ids[i]]), jnp.array([i]), kv, tables, attention)
    logits = logits[0]
  return np.asarray(logits)


def assert_relative(ours, theirs, rel):
  err = np.abs(ours - theirs).max() / np.abs(theirs).max()
  assert err < rel, f"relative error {err:.2e}"


@pytest.fixture(scope="module")
def smollm():
  return checkpoint.load(None, dtype=jnp.float32, use_cache=False)


@pytest.fixture(scope="module")
def hf_smollm():
  path = checkpoint.default_model_path()
  return transformers.AutoModelForCausalLM.from_pretrained(
      path.parent, gguf_file=path.name, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tokenizer():
  path = checkpoint.default_model_path()
  return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.slow
def test_smollm2_last_logits_match_transformers_on_512_tokens(smollm, hf_smollm):
  ids = smollm.tokenizer.encode(prose(4000))[:512]
  assert len(ids) == 512
  assert_relative(our_logits(smollm.model, ids), hf_logits(hf_smollm, ids)[-1], 1e-3)


def test_smollm2_decode_steps_match_transformers(smollm, hf_smollm):
  ids = smollm.tokenizer.encode(prose(600))[:100]
  assert_relative(our_logits(smollm.model, ids, AttentionBackend.named("dense"), decode_last=3),
                  hf_logits(hf_smollm, ids)[-1], 1e-3)


@pytest.mark.slow
def test_smollm2_psa_with_tau_one_reproduces_dense_logits(smollm):
  ids = smollm.tokenizer.encode(prose(3000))[:300]
  dense = our_logits(smollm.model, ids, AttentionBackend.named("dense"), decode_last=2)
  psa = our_logits(smollm.model, ids, AttentionBackend.named("psa", tau=1.0), decode_last=2)
  assert_relative(psa, dense, 1e-5)


@pytest.mark.slow
def test_smollm2_64_greedy_tokens_match_transformers(smollm, hf_smollm):
  tok = smollm.tokenizer
  prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}]))
  ours = generate(smollm.model, prompt, max_new_tokens=64)
  with torch.no_grad():
    theirs = hf_smollm.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False,
                                eos_token_id=list(tok.eos_token_ids), pad_token_id=2)[0, len(prompt):].tolist()
  assert ours == theirs
  assert len(ours) >= 16


def test_tokenizer_matches_transformers_on_mixed_text(smollm, hf_tokenizer):
  text = (prose(2500) + "\nnumbers 12345 3.14159 -0.5e10, code: def f(x):\n\treturn x**2  # ok\n"
          "unicode: café naïve 東京 😀 — “quotes” \u00a0nbsp <|im_start|>user\nhi<|im_end|>\n  trailing  ")
  assert len(text) > 2500
  ours = smollm.tokenizer.encode(text)
  assert ours == hf_tokenizer.encode(text, add_special_tokens=False)
  assert smollm.tokenizer.decode(ours, skip_special_tokens=False) == text


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
])
def test_chat_template_renders_like_transformers(smollm, hf_tokenizer, messages):
  assert smollm.tokenizer.apply_chat_template(messages) == hf_tokenizer.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.slow
@pytest.mark.parametrize("arch,rope_scaling", [
    ("llama", None),
    ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}),
    ("qwen2", None),
], ids=["llama", "llama3_rope", "qwen2_bias"])
def test_tiny_safetensors_models_match_transformers(tmp_path, arch, rope_scaling):
  hf = tiny_models.save_tiny_hf(tmp_path, arch, rope_scaling=rope_scaling)
  loaded = checkpoint.load(tmp_path, dtype=jnp.float32, use_cache=False)
  assert loaded.model.config.qkv_bias == (arch == "qwen2")
  ids = list(np.random.default_rng(0).integers(100, 49000, size=200))
  assert_relative(our_logits(loaded.model, ids, AttentionBackend.named("dense"), decode_last=2),
                  hf_logits(hf, ids)[-1], 1e-4)
  ours = generate(loaded.model, ids[:20], max_new_tokens=12, stop_ids=())
  with torch.no_grad():
    theirs = hf.generate(torch.tensor([ids[:20]]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                         pad_token_id=0)[0, 20:].tolist()
  assert ours == theirs
  assert loaded.tokenizer.apply_chat_template([{"role": "user", "content": "x"}]).endswith("assistant\n")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
  """One tiny Hugging Face Llama for the GGUF writer tests (building it is most of such a test's time)."""
  return tiny_models.save_tiny_hf(tmp_path_factory.mktemp("hf"), "llama")


@pytest.mark.slow
@pytest.mark.parametrize("qtype,rel", [("F32", 1e-5), ("F16", 3e-3), ("BF16", 2e-2), ("Q8_0", 2e-2),
                                       ("Q4_0", 0.3), ("Q4_1", 0.3)])
def test_gguf_dequantizes_and_unpermutes_like_the_writer(tmp_path, tiny_llama, qtype, rel):
  hf = tiny_llama
  stored = tiny_models.write_tiny_gguf(tmp_path / "m.gguf", hf, qtype=qtype)
  config, _, tensors = checkpoint.read_gguf(tmp_path / "m.gguf")
  got = dict(tensors())
  # The loader returns exactly the dequantized values, in HF layout (Q/K permutation undone).
  np.testing.assert_array_equal(got["model.layers.1.mlp.up_proj.weight"], stored["blk.1.ffn_up.weight"])
  if qtype == "F32":
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
      np.testing.assert_array_equal(got[name], hf.state_dict()[name].numpy())
  decoder = checkpoint.build_decoder(config, got.items(), jnp.float32)
  ids = list(np.random.default_rng(1).integers(100, 49000, size=64))
  assert_relative(our_logits(decoder, ids), hf_logits(hf, ids)[-1], rel)


def test_converted_parameters_are_cached_and_restored(tmp_path, monkeypatch):
  monkeypatch.setenv("PSA_JAX_CACHE", str(tmp_path / "cache"))
  tiny_models.save_tiny_hf(tmp_path / "hf", "qwen2")
  first = checkpoint.load(tmp_path / "hf", dtype=jnp.bfloat16)
  assert list((tmp_path / "cache").iterdir())
  monkeypatch.setattr(checkpoint, "read_hf_directory", lambda *_: pytest.fail("the checkpoint was read again"))
  second = checkpoint.load(tmp_path / "hf", dtype=jnp.bfloat16)
  assert second.model.wq[...].dtype == jnp.bfloat16
  # The config and tokenizer come from the cache too, without reading the checkpoint's files again.
  assert second.model.config == first.model.config
  text = "<|im_start|>user\nnaïve 東京<|im_end|>"
  assert second.tokenizer.encode(text) == first.tokenizer.encode(text)
  assert second.tokenizer.chat_template == first.tokenizer.chat_template
  np.testing.assert_array_equal(np.asarray(first.model.bq[...], np.float32),
                                np.asarray(second.model.bq[...], np.float32))


def test_truncated_gguf_fails_clearly(tmp_path):
  src = checkpoint.default_model_path()
  with open(src, "rb") as f:
    (tmp_path / "cut.gguf").write_bytes(f.read(1_000_000))
  with pytest.raises(checkpoint.CheckpointError, match="cut.gguf"):
    checkpoint.load(tmp_path / "cut.gguf", use_cache=False)


def test_gguf_of_unsupported_architecture_fails_clearly(tmp_path):
  import gguf
  writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
  writer.add_block_count(1)
  writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(checkpoint.CheckpointError, match="architecture 'gpt2' is not supported"):
    checkpoint.load(tmp_path / "gpt2.gguf", use_cache=False)


def test_a_mixture_of_experts_is_refused_by_name_from_gguf_and_safetensors(tmp_path):
  import gguf
  writer = gguf.GGUFWriter(str(tmp_path / "mixtral.gguf"), "llama")  # as llama.cpp writes Mixtral
  writer.add_block_count(1)
  writer.add_expert_count(8)
  writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(checkpoint.CheckpointError, match=r"mixture-of-experts model \(8 experts\)"):
    checkpoint.load(tmp_path / "mixtral.gguf", use_cache=False)
  tiny_models.save_tiny_hf(tmp_path / "hf", "llama")
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "mixtral", "num_local_experts": 4}))
  with pytest.raises(checkpoint.CheckpointError, match=r"mixture-of-experts model \(4 experts\)"):
    checkpoint.load(tmp_path / "hf", use_cache=False)


def test_directory_without_weights_fails_clearly(tmp_path):
  (tmp_path / "config.json").write_text('{"model_type": "llama"}')
  with pytest.raises(checkpoint.CheckpointError, match="safetensors"):
    checkpoint.load(tmp_path, use_cache=False)


def test_missing_model_says_what_was_looked_for():
  with pytest.raises(checkpoint.CheckpointError, match="nothing is downloaded|Nothing is downloaded"):
    checkpoint.load("/no/such/model.gguf")


def test_default_model_alias_resolves_to_the_wheel():
  assert checkpoint.resolve("smollm2-135m-instruct") == checkpoint.resolve(None)
  assert checkpoint.resolve(None).suffix == ".gguf"


@pytest.mark.parametrize("t,c,start,query_chunk", [(40, 48, 0, 512), (512, 528, 0, 512), (300, 1000, 500, 128),
                                                    (700, 2048, 100, 512)])
def test_prefill_attention_equals_a_plain_causal_softmax(t, c, start, query_chunk):
  """The key-block loop with causal skipping, on contexts that are and are not multiples of the key block."""
  import jax
  from psa_jax.models.llama import _causal_context_attention

  rng = np.random.default_rng(t)
  b, hq, h, d = 2, 6, 2, 16
  q = jnp.asarray(rng.normal(size=(b, t, hq, d)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, h, c, d)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, h, c, d)), jnp.float32)
  positions = jnp.minimum(jnp.arange(t)[None] + start + 3 * jnp.arange(b)[:, None], c - 1)
  logits = jnp.einsum("bthgd,bhcd->bhgtc", q.reshape(b, t, h, hq // h, d), k) / np.sqrt(d)
  logits = jnp.where((jnp.arange(c)[None, None, :] <= positions[:, :, None])[:, None, None], logits, -jnp.inf)
  want = jnp.einsum("bhgtc,bhcd->bthgd", jax.nn.softmax(logits, axis=-1), v).reshape(b, t, hq, d)
  got = _causal_context_attention(q, k, v, positions, query_chunk)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


# --------------------------------------------------------------------------- parity with transformers
# Each checkpoint variant a user may bring, built tiny and random with transformers: every position's logits over
# 160 tokens within 1e-4 of transformers' (float32), decode steps through dense and PSA at tau 1, and 16 greedy
# tokens identical. From safetensors, and from a GGUF written as llama.cpp's converter writes it.
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
PARITY = {  # name: (architecture, transformers config fields)
    "linear_rope": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "yarn_rope": ("llama", dict(rope_scaling=YARN)),
    "yarn_rope_mscale": ("llama", dict(rope_scaling={
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 128, "mscale": 0.707,
        "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2})),
    "llama_biases": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "qwen3": ("qwen3", {}),
    "qwen3_yarn": ("qwen3", dict(rope_scaling=YARN)),
}


def assert_parity(loaded, hf, n_tokens=160):
  ids = [int(x) for x in np.random.default_rng(1).integers(100, 49000, size=n_tokens)]
  model = loaded.model
  c = model.config
  width = -(-n_tokens // 16)
  kv = PagedKV.zeros(c.num_kv_heads, c.num_layers * width, 16, c.head_dim, model.dtype)
  tables = jnp.arange(c.num_layers * width, dtype=jnp.int32).reshape(c.num_layers, 1, width)
  x, _ = model.prefill(jnp.asarray([ids]), jnp.zeros(1, jnp.int32), jnp.array([n_tokens]), kv, tables)
  theirs = hf_logits(hf, ids)
  np.testing.assert_allclose(np.asarray(model.logits(x[0])), theirs, atol=1e-4, rtol=0)
  for attention in (AttentionBackend.named("dense"), AttentionBackend.named("psa", tau=1.0)):
    np.testing.assert_allclose(our_logits(model, ids, attention, decode_last=3), theirs[-1], atol=1e-4, rtol=0)
  ours = generate(model, ids[:20], max_new_tokens=16, stop_ids=())
  with torch.no_grad():
    greedy = hf.generate(torch.tensor([ids[:20]]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                         pad_token_id=0)[0, 20:].tolist()
  assert ours == greedy


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(PARITY))
def test_architectures_rope_scalings_and_biases_match_transformers_from_safetensors(tmp_path, variant):
  arch, fields = PARITY[variant]
  hf = tiny_models.save_tiny_hf(tmp_path, arch, seed=2, **fields)
  assert_parity(checkpoint.load(tmp_path, dtype=jnp.float32, use_cache=False), hf)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["linear_rope", "yarn_rope", "llama_biases", "qwen3"])
def test_architectures_rope_scalings_and_biases_match_transformers_from_gguf(tmp_path, variant):
  arch, fields = PARITY[variant]
  hf = tiny_models.save_tiny_hf(tmp_path / "hf", arch, seed=2, **fields)
  tiny_models.write_tiny_gguf(tmp_path / "m.gguf", hf, arch=arch)
  assert_parity(checkpoint.load(tmp_path / "m.gguf", dtype=jnp.float32, use_cache=False), hf)


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "factor": 2.0}, {"rope_type": "longrope", "factor": 2.0},
                                  {"rope_type": "unheard_of", "factor": 2.0}])
def test_a_rope_scaling_psa_jax_does_not_implement_is_refused_by_name(tmp_path, rope):
  tiny_models.save_tiny_hf(tmp_path, "llama")
  config = json.loads((tmp_path / "config.json").read_text())
  config["rope_scaling"] = rope
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(checkpoint.CheckpointError, match=rf"RoPE scaling '{rope['rope_type']}' is not implemented"):
    checkpoint.load(tmp_path, dtype=jnp.float32, use_cache=False)


def test_a_bias_the_config_does_not_declare_is_refused_not_dropped(tmp_path):
  tiny_models.save_tiny_hf(tmp_path, "llama", attention_bias=True)
  config = json.loads((tmp_path / "config.json").read_text())
  config["attention_bias"] = False
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(checkpoint.CheckpointError, match="o_proj.bias, a tensor its config does not declare"):
    checkpoint.load(tmp_path, dtype=jnp.float32, use_cache=False)


@pytest.mark.slow
def test_a_sliding_window_model_is_served_up_to_its_window_where_it_equals_transformers(tmp_path, capfd):
  hf = tiny_models.save_tiny_hf(tmp_path, "mistral", seed=2, sliding_window=192)
  loaded = checkpoint.load(tmp_path, dtype=jnp.float32, use_cache=False)
  assert loaded.model.config.max_context == 192
  assert "sliding window of 192 tokens" in capfd.readouterr().err
  assert_parity(loaded, hf, n_tokens=160)


def test_a_directory_with_consolidated_weights_beside_its_shards_reads_each_weight_once(tmp_path):
  hf = tiny_models.save_tiny_hf(tmp_path, "llama", seed=2)
  (tmp_path / "model.safetensors").rename(tmp_path / "model-00001-of-00001.safetensors")
  names = {k: "model-00001-of-00001.safetensors" for k in hf.state_dict()}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": names}))
  (tmp_path / "consolidated.safetensors").write_bytes(b"not read")  # Mistral's own layout, repeating the weights
  assert checkpoint.weight_files(tmp_path) == [tmp_path / "model-00001-of-00001.safetensors"]
  (tmp_path / "model.safetensors.index.json").unlink()
  assert checkpoint.weight_files(tmp_path) == [tmp_path / "model-00001-of-00001.safetensors"]
  loaded = checkpoint.load(tmp_path, dtype=jnp.float32, use_cache=False)
  ids = [int(x) for x in np.random.default_rng(0).integers(100, 49000, size=40)]
  np.testing.assert_allclose(our_logits(loaded.model, ids), hf_logits(hf, ids)[-1], atol=1e-4, rtol=0)
