"""The benchmark studies run end to end at toy sizes and write their tables, JSON and plots."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from psa_jax.bench import e2e, kernel
from tests import tiny_models


def test_kernel_study_writes_rows_and_a_plot(tmp_path):
  rows = kernel.run(kernel.KernelConfig(contexts=(256,), repeats=1), tmp_path)
  assert {r["attention"] for r in rows} == {"dense", "topk", "psa"}
  dense = next(r for r in rows if r["attention"] == "dense")
  assert dense["mean_error"] == 0 and dense["kv_share_read"] == 1
  assert all(0 < r["kv_share_read"] <= 1 and r["ms"] > 0 for r in rows)
  assert (tmp_path / "kernel.png").stat().st_size > 0
  assert json.loads((tmp_path / "kernel.json").read_text())["rows"] == rows


@pytest.mark.slow
def test_e2e_study_decodes_every_pair_from_one_prefill(tmp_path):
  model_dir = tmp_path / "tiny"
  tiny_models.save_tiny_hf(model_dir, "llama", seed=5)
  config = e2e.E2EConfig(model=str(model_dir), contexts=(48,), batches=(2,), decode_steps=8, decode_window=4)
  rows = e2e.run(config, tmp_path / "out")
  assert [(r["attention"], r["batch"]) for r in rows] == [(a, 2) for a in ("dense", "topk", "psa")]
  assert all(r["tokens_per_s"] > 0 and 0 < r["kv_share_read"] <= 1 for r in rows)
  # Two timed windows of 4 tokens; the row is the median window, between the fastest and the slowest.
  assert all(r["ms_per_token_min"] <= r["ms_per_token"] <= r["ms_per_token_max"] for r in rows)
  assert all(abs(r["tokens_per_s"] - 1e3 * r["batch"] / r["ms_per_token"]) < 1e-6 * r["tokens_per_s"] for r in rows)
  assert (tmp_path / "out" / "e2e_float_batch2.png").exists()


@pytest.mark.slow
def test_serving_study_drives_a_real_server_at_every_concurrency(tmp_path):
  from psa_jax.bench import serving

  # --warmup=false: the server's own start-up warm-up compiles every shape up to --warmup_context, minutes with a
  # cold compilation cache; the study's warm-up compiles the few this workload meets.
  # A tiny model: this pins the study's mechanics; the real figures come from running it on the default model.
  tiny_models.save_tiny_hf(tmp_path / "model", "llama", seed=2)
  config = serving.ServingConfig(attentions=("psa",), schedulers=(), concurrencies=(1, 2), num_prompts=3,
                                 prompt_tokens=64, output_tokens=8, model=str(tmp_path / "model"),
                                 server_flags=("--max_context=512", "--kv_memory=16MiB", "--warmup=false"))
  rows = serving.run(config, tmp_path)
  saved = json.loads((tmp_path / "serving.json").read_text())["rows"]
  assert saved == rows
  assert [(r["attention"], r["concurrency"]) for r in saved] == [("psa", 1), ("psa", 2)]
  for r in saved:
    assert r["completed"] == 3 and r["failed"] == 0, r["errors"]
    assert r["p50_ttft_ms"] > 0 and r["output_throughput"] > 0
    assert r["p50_ttft_ms"] <= r["p50_e2el_ms"]
    assert r["total_input_tokens"] == 3 * 64
    assert r["compilations"] is not None  # read from the server's /metrics
  assert (tmp_path / "serving.png").stat().st_size > 0
  assert (tmp_path / "server_psa_default.log").stat().st_size > 0  # the server's output is kept


def test_task_prompts_have_the_requested_length_and_hide_their_answer():
  from psa_jax.bench import tasks

  tok = tiny_models.smollm_tokenizer()
  config = tasks.TasksConfig(contexts=(300, 700), samples=2)
  samples = tasks.make_samples(tok, config)
  assert len(samples) == 2 * 2 * len(tasks.TASKS)
  for s in samples:
    assert len(s.ids) == s.context
    text = tok.decode(s.ids)
    assert text.count(s.answer) == 1  # stated once in the haystack, never in the question
    assert text.rstrip().endswith(("is", "value", "number"))


@pytest.mark.slow
def test_tasks_study_scores_every_method_from_one_prefill(tmp_path):
  from psa_jax.bench import tasks

  model_dir = tmp_path / "tiny"
  tiny_models.save_tiny_hf(model_dir, "llama", seed=6)
  config = tasks.TasksConfig(model=str(model_dir), contexts=(200,), samples=1, topk_blocks=(2,), topp=(0.9,),
                             taus=(0.5, 1.0), answer_tokens=4, ppl_context=240, ppl_tokens=8)
  rows = tasks.run(config, tmp_path / "out")
  by_name = {(r["method"], r["setting"]): r for r in rows}
  assert set(by_name) == {("dense", None), ("topk", 2), ("topp", 0.9), ("psa", 0.5), ("psa", 1.0)}
  assert by_name[("dense", None)]["kv_share_read"] == 1
  assert all(0 < r["kv_share_read"] <= 1 and 0 <= r["accuracy"] <= 1 and r["perplexity"] > 1 for r in rows)
  # tau = 1 reads every block and predicts exactly what dense does.
  assert by_name[("psa", 1.0)]["ppl_kv_share_read"] == 1
  np.testing.assert_allclose(by_name[("psa", 1.0)]["perplexity"], by_name[("dense", None)]["perplexity"], rtol=1e-4)
  assert (tmp_path / "out" / "tasks_accuracy.png").stat().st_size > 0


def _shared_context_inputs(lengths, seed=0):
  """Synthetic decode inputs where every row reads the same run of pages (one document, many positions)."""
  from psa_jax.synthetic import synthetic_decode_inputs

  x = synthetic_decode_inputs(seed, (max(lengths),), q_heads=6, kv_heads=2, head_dim=16)
  batch = len(lengths)
  q = np.random.default_rng(seed).normal(size=(batch, 6, 16)).astype(np.float32)
  table = np.repeat(np.asarray(x.block_table), batch, axis=0)
  return x._replace(q=q, block_table=table, lengths=np.asarray(lengths, np.int32))


@pytest.mark.parametrize("method", [
    ("topk", 3, {"score": "minmax"}), ("topk", 2, {"score": "hybrid"}),
    ("psa", 0.8, {"estimator": "value", "score": "hybrid", "patience": 2}),
    ("psa", 0.9, {"estimator": "last_chunk", "compensate": True}),
])
def test_shared_context_attention_matches_the_library_oracle(method):
  from psa_jax.backend import AttentionBackend
  from psa_jax.bench import quality
  from psa_jax.config import PSAConfig, TopKConfig

  kind, knob, fields = method
  config = PSAConfig(tau=knob, **fields) if kind == "psa" else TopKConfig(k_blocks=knob, **fields)
  x = _shared_context_inputs((1, 17, 64, 100, 128))
  attention = quality.SharedContextAttention(quality.Method(kind, knob, kind, config), layer_width=8)
  # Per (row, KV head), as the model's decode step passes it; for PSA, KV head 1 reads densely.
  tau = np.full((5, 2), float(knob), np.float32)
  if kind == "psa":
    tau[:, 1] = 1.0
  got, got_used = attention(*x, tau)
  want, want_used = AttentionBackend(kind, config, "reference")(*x, tau if kind == "psa" else None)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(got_used, want_used)


@pytest.mark.slow
def test_quality_study_scores_curves_needles_and_the_headline(tmp_path):
  from psa_jax.bench import quality
  from psa_jax.config import PSAConfig, TopKConfig

  model_dir = tmp_path / "tiny"
  tiny_models.save_tiny_hf(model_dir, "llama", seed=7)
  docs = []
  for i, text in enumerate([tiny_models_text(0), tiny_models_text(1)]):
    path = tmp_path / f"doc{i}.txt"
    path.write_text(text)
    docs.append(str(path))
  m = quality.Method
  methods = (m("topk", 2, "topk", TopKConfig(k_blocks=2)), m("topk", 32, "topk", TopKConfig(k_blocks=32)),
             m("psa", 0.5, "psa", PSAConfig(tau=0.5, estimator="value", score="hybrid", patience=2)),
             m("psa", 1.0, "psa", PSAConfig(tau=1.0, estimator="value", score="hybrid", patience=2)),
             m("psa_oracle_order", 0.5, "psa", PSAConfig(tau=0.5, estimator="value"), True))
  config = quality.QualityConfig(model=str(model_dir), documents=tuple(docs), contexts=(192, 256), positions=8,
                                 methods=methods, needle_tasks=("facts", "records"), needle_questions=2,
                                 needle_methods=("psa@0.5",), rows_per_batch=8, bootstrap=20)
  result = quality.run(config, tmp_path / "out")
  rows = {(r["context"], r["family"], r["setting"]): r for r in result["rows"]}
  assert len(rows) == 2 * len(methods)
  for context in (192, 256):
    # tau = 1 reads every block and predicts exactly what dense does; a top-k budget past the context is dense.
    for exact in (("psa", 1.0), ("topk", 32.0)):
      assert rows[(context, *exact)]["kv_share"] == 1
      assert rows[(context, *exact)]["kl"] < 1e-6 and rows[(context, *exact)]["top1"] == 1
    assert rows[(context, "topk", 2.0)]["kv_share"] < 1
    assert all(0 < r["kv_share"] <= 1 and r["kl"] >= 0 for r in result["rows"])
  assert {(h["context"], h["topk_k"]) for h in result["headline"]} == {(192, 32), (256, 32)}
  needles = {(n["context"], n["task"], n["method"]): n for n in result["needles"]}
  assert set(needles) == {(c, t, mth) for c in (192, 256) for t in ("facts", "records") for mth in ("dense", "psa@0.5")}
  assert all(n["questions"] == 2 and n["ci95"][0] <= n["accuracy"] <= n["ci95"][1] for n in needles.values())
  for name in ("quality.json", "quality_kl_192.png", "quality_layers_256.png"):
    assert (tmp_path / "out" / name).stat().st_size > 0


def test_needle_contexts_have_the_requested_length_and_state_each_answer_once():
  from psa_jax.bench import quality

  tok = tiny_models.smollm_tokenizer()
  for task in quality.NEEDLE_TASKS:
    ids, answers = quality.needle_context(task, tok, 1024, 6, seed=3)
    assert len(ids) == 1024 and len(answers) == 6
    for start, n in answers:
      answer = tok.decode(ids[start:start + n]).strip()
      assert len(answer) == 7 and answer.isdigit()
      assert tok.decode(ids).count(answer) == 2  # once in the haystack, once as the answer


def test_blocks_to_reach_interpolates_on_the_monotone_curve():
  from psa_jax.bench import quality

  curve = [(0.1, 1e-2), (0.2, 1e-3), (0.4, 1e-4), (0.3, 5e-3)]  # the 0.3 point is dominated by 0.2
  assert quality.blocks_to_reach(curve, 1e-3) == 0.2
  assert abs(quality.blocks_to_reach(curve, 10 ** -3.5) - 0.3) < 1e-9
  assert quality.blocks_to_reach(curve, 1e-5) is None
  assert quality.blocks_to_reach(curve, 1.0) == 0.1
  lo, hi = quality.wilson(12, 24)
  assert lo < 0.5 < hi and abs((lo + hi) / 2 - 0.5) < 1e-9


def tiny_models_text(i):
  """Distinct text that every Python install has: module sources of the standard library."""
  import inspect
  import argparse
  import tarfile
  return inspect.getsource((argparse, tarfile)[i])


@pytest.mark.slow
def test_loading_study_measures_each_checkpoint_in_a_child_and_its_synthetic_files_load(tmp_path):
  from psa_jax.bench import loading
  from psa_jax.models import checkpoint

  shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=128, vocab_size=49152)
  rows = loading.run(loading.LoadingConfig(dtypes=("float32",), shape=shape), tmp_path)
  assert [r["checkpoint"] for r in rows] == ["smollm2-135m-instruct", "synthetic GGUF, Q8_0",
                                             "synthetic safetensors, bfloat16"]
  for row in rows:
    assert 0 < row["base_rss_gib"] <= row["peak_rss_gib"] and row["peak_over_params"] > 1
  # The synthetic checkpoints are real ones: both load to the same shapes.
  gguf = checkpoint.load(tmp_path / "checkpoints" / "llama-synthetic-q8_0.gguf", dtype=jnp.float32, use_cache=False)
  hf = checkpoint.load(tmp_path / "checkpoints" / "llama-synthetic-bf16", dtype=jnp.float32, use_cache=False)
  assert gguf.model.config.num_layers == hf.model.config.num_layers == 2
  assert gguf.model.wq[...].shape == hf.model.wq[...].shape == (2, 64, 64)
  assert (tmp_path / "loading.json").exists()
