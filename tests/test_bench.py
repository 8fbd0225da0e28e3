"""The benchmark studies run end to end at toy sizes and write their tables, JSON and plots."""

import json

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
  assert (tmp_path / "out" / "e2e_float_batch2.png").exists()
