"""Specification of retrieval heads: the (layer, KV head) pairs PSA reads densely, how a model's list is found,
and the study that finds it (psa_jax/retrieval_heads.py, psa_jax/bench/heads.py)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from psa_jax import retrieval_heads
from psa_jax.backend import AttentionBackend, dense_head_mask, head_thresholds
from psa_jax.config import PSAConfig
from psa_jax.models import checkpoint
from psa_jax.models.kv_pages import PagedKV
from tests import tiny_models


def test_a_list_of_pairs_parses_sorted_and_none_is_empty():
  assert retrieval_heads.parse("18:2,7:2,17:1,7:2") == ((7, 2), (17, 1), (18, 2))
  assert retrieval_heads.parse("none") == () and retrieval_heads.parse("") == ()
  for bad in ("7", "7:x", "-1:0", "1:2:3"):
    with pytest.raises(ValueError, match="LAYER:KV_HEAD|>= 0"):
      retrieval_heads.parse(bad)


def test_auto_takes_the_file_beside_the_model_then_the_default_models_list(tmp_path):
  model_dir = tmp_path / "model"
  model_dir.mkdir()
  assert retrieval_heads.resolve("auto", str(model_dir), model_dir) == ()  # no calibration: none
  (model_dir / retrieval_heads.FILE_NAME).write_text(json.dumps({"dense_heads": [[3, 1], [0, 0]]}))
  assert retrieval_heads.resolve("auto", str(model_dir), model_dir) == ((0, 0), (3, 1))
  gguf = tmp_path / "m.gguf"
  assert retrieval_heads.beside(gguf) == tmp_path / f"m.gguf.{retrieval_heads.FILE_NAME}"
  default = retrieval_heads.CALIBRATED[checkpoint.DEFAULT_MODEL]
  assert retrieval_heads.resolve("auto", None, None) == default
  assert retrieval_heads.resolve("none", None, None) == ()
  assert retrieval_heads.resolve("2:0", None, None) == ((2, 0),)
  assert retrieval_heads.resolve(str(model_dir / retrieval_heads.FILE_NAME), None, None) == ((0, 0), (3, 1))
  (tmp_path / "bad.json").write_text("{}")
  with pytest.raises(ValueError, match="not a dense-heads file"):
    retrieval_heads.resolve(str(tmp_path / "bad.json"), None, None)


def test_dense_heads_are_a_psa_setting_inside_the_model():
  with pytest.raises(ValueError, match="PSA setting"):
    AttentionBackend.named("topk", dense_heads=((0, 0),))
  with pytest.raises(ValueError, match="pairs"):
    AttentionBackend.named("psa", dense_heads=((0, -1),))
  backend = AttentionBackend.named("psa", dense_heads=((1, 0), (2, 1)))
  mask = dense_head_mask(backend, num_layers=3, num_kv_heads=2)
  np.testing.assert_array_equal(mask, [[False, False], [True, False], [False, True]])
  with pytest.raises(ValueError, match="outside a model of 2 layers"):
    dense_head_mask(backend, num_layers=2, num_kv_heads=2)


def test_dense_heads_are_dense_from_their_tau_up_and_scaled_below_it():
  backend = AttentionBackend.named("psa", dense_heads=((0, 1),), dense_heads_tau=0.8)
  tau = jnp.asarray([0.2, 0.4, 0.8, 0.9, 1.0], jnp.float32)
  got = np.asarray(head_thresholds(backend, tau, jnp.asarray([False, True])))
  np.testing.assert_allclose(got[:, 0], tau)  # other heads: the request's tau
  np.testing.assert_allclose(got[:, 1], [0.25, 0.5, 1.0, 1.0, 1.0], rtol=1e-6)
  with pytest.raises(ValueError, match="dense_heads_tau"):
    AttentionBackend.named("psa", dense_heads=((0, 1),), dense_heads_tau=0.0)


@pytest.mark.slow
def test_a_dense_head_reads_every_block_and_every_head_dense_is_dense_attention(tmp_path):
  tiny_models.save_tiny_hf(tmp_path, "llama", seed=5)
  model = checkpoint.load(str(tmp_path), dtype=jnp.float32).model
  c = model.config
  n_tokens, block = 300, 16
  width = -(-n_tokens // block) + 1
  tables = jnp.arange(c.num_layers * width, dtype=jnp.int32).reshape(c.num_layers, 1, width)
  kv = PagedKV.zeros(c.num_kv_heads, c.num_layers * width, block, c.head_dim, jnp.float32)
  tokens = jnp.asarray([np.random.default_rng(0).integers(3, c.vocab_size, n_tokens)], jnp.int32)
  _, kv = model.prefill(tokens, jnp.zeros(1, jnp.int32), jnp.array([n_tokens]), kv, tables)

  def decode(attention):
    logits, _, used = model.decode(jnp.array([5]), jnp.array([n_tokens]), kv, tables, attention)
    return np.asarray(logits), np.asarray(used)  # used [L, B, H]

  knob = dict(tau=0.3, chunk_blocks=1)
  dense_logits, _ = decode(AttentionBackend.named("dense"))
  every_head = tuple((layer, head) for layer in range(c.num_layers) for head in range(c.num_kv_heads))
  dense_from = dict(dense_heads_tau=knob["tau"])  # the request's tau (the config's) reaches it: dense
  np.testing.assert_allclose(decode(AttentionBackend.named("psa", dense_heads=every_head, **dense_from, **knob))[0],
                             dense_logits, rtol=1e-5, atol=1e-5)
  _, used = decode(AttentionBackend.named("psa", dense_heads=((1, 0),), **dense_from, **knob))
  _, sparse = decode(AttentionBackend.named("psa", **knob))
  n_blocks = -(-(n_tokens + 1) // block)
  assert (used[1, :, 0] == n_blocks).all() and (sparse[1, :, 0] < n_blocks).all()
  rest = np.ones(used.shape, bool)
  rest[1, :, 0] = False
  np.testing.assert_array_equal(used[rest], sparse[rest])  # every other head reads what it read without


def test_an_engine_refuses_a_dense_head_outside_its_model(tmp_path):
  from psa_jax.serving.engine import Engine

  tiny_models.save_tiny_hf(tmp_path, "llama", seed=5)
  lm = checkpoint.load(str(tmp_path), dtype=jnp.float32)
  config = tiny_models.engine_config(max_context=256, psa_dense_heads=((lm.model.config.num_layers, 0),))
  with pytest.raises(ValueError, match="outside a model"):
    Engine(lm.model, None, config, num_pages=64)


@pytest.mark.slow
def test_the_heads_study_scores_every_head_and_picks_the_share_with_the_heaviest_skipped_blocks(tmp_path):
  from psa_jax.bench import heads

  tiny_models.save_tiny_hf(tmp_path / "model", "llama", seed=4)
  doc = tmp_path / "doc.txt"
  doc.write_text(" ".join(f"word{i % 97} of line {i}." for i in range(3000)))
  config = heads.HeadsConfig(model=str(tmp_path / "model"), documents=(str(doc),), context=400, positions=8,
                             share=0.25)
  meta = heads.run(config, tmp_path / "out")
  score = np.asarray(meta["score"])
  lm = checkpoint.load(str(tmp_path / "model"))
  c = lm.model.config
  assert score.shape == (c.num_layers, c.num_kv_heads) and ((0 <= score) & (score <= 1)).all()
  chosen = [tuple(p) for p in meta["dense_heads"]]
  assert len(chosen) == -(-score.size // 4)
  assert min(score[p] for p in chosen) >= max(score[p] for p in np.ndindex(score.shape) if p not in chosen)
  assert retrieval_heads.read(tmp_path / "out" / "heads.json") == tuple(sorted(chosen))  # what the flag reads
  assert (tmp_path / "out" / "heads.png").stat().st_size > 0
  # At tau 1 PSA skips nothing, so no head scores.
  full = heads.scores(lm, lm.tokenizer.encode(doc.read_text())[:200], heads.HeadsConfig(
      context=200, positions=4, psa=PSAConfig(tau=1.0)))
  assert not full.any()
