"""The benchmark studies run end to end at toy sizes and write their tables, JSON and plots."""

import json

import numpy as np

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


def test_e2e_study_decodes_every_pair_from_one_prefill(tmp_path):
  model_dir = tmp_path / "tiny"
  tiny_models.save_tiny_hf(model_dir, "llama", seed=5)
  config = e2e.E2EConfig(model=str(model_dir), contexts=(48,), batches=(1, 2), decode_steps=8, decode_window=4)
  rows = e2e.run(config, tmp_path / "out")
  assert [(r["attention"], r["batch"]) for r in rows] == [(a, b) for a in ("dense", "topk", "psa") for b in (1, 2)]
  assert all(r["tokens_per_s"] > 0 and 0 < r["kv_share_read"] <= 1 for r in rows)
  # Two timed windows of 4 tokens; the row is the median window, between the fastest and the slowest.
  assert all(r["ms_per_token_min"] <= r["ms_per_token"] <= r["ms_per_token_max"] for r in rows)
  assert all(abs(r["tokens_per_s"] - 1e3 * r["batch"] / r["ms_per_token"]) < 1e-6 * r["tokens_per_s"] for r in rows)
  assert (tmp_path / "out" / "e2e_float_batch2.png").exists()


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
