"""The GPU check runs here in its smoke mode, so that the script is known to work on the rare day a GPU is lent."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_smoke_run_checks_every_kernel_and_decodes_every_attention(tmp_path):
  proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--smoke", f"--out_dir={tmp_path}"],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads((tmp_path / "gpu_check.json").read_text())
  stages = report["stages"]
  assert {s: stages[s]["status"] for s in stages} == {
      s: "ok" for s in ("environment", "compile", "kernels", "engine", "torch")}
  assert stages["environment"]["missing"] == []
  # The GPU build of each attention's kernels, compiled for Hopper before anything runs.
  assert {(r["kind"], r["kernel"], r["status"]) for r in stages["compile"]["rows"]} == {
      ("dense", "progressive_attention_fixed", "ok"), ("topk", "block_scores_minmax", "ok"),
      ("topk", "progressive_attention_fixed", "ok"), ("psa", "block_scores_hybrid", "ok"),
      ("psa", "progressive_attention_value", "ok")}
  assert stages["compile"]["failed_kinds"] == {}
  kernels = stages["kernels"]["rows"]
  assert {(r["kind"], r["dtype"]) for r in kernels} == {
      (k, d) for k in ("dense", "topk", "psa") for d in ("bfloat16", "float32")}
  assert all(r["ok"] and r["rows_same_blocks"] == 1.0 and r["bytes_read"] > 0 for r in kernels)
  decode = [r for r in stages["engine"]["rows"] if r["part"] == "decode"]
  assert {(r["attention"], r["batch"]) for r in decode} == {(a, 2) for a in ("dense", "topk", "psa")}
  assert all(r["tokens_per_s"] > 0 and 0 < r["kv_share_read"] <= 1 and not r["fallback"] for r in decode)
  assert [r["attention"] for r in stages["torch"]["rows"]] == ["torch_sdpa"]
  assert (tmp_path / "gpu_check.png").stat().st_size > 0
  assert "torch_sdpa" in proc.stdout  # the table is printed


def test_a_stage_past_its_cap_is_reported_and_the_run_fails(tmp_path):
  proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--smoke", f"--out_dir={tmp_path}",
                         "--stages=environment,kernels", "--caps=kernels=2"],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1
  stages = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
  assert stages["kernels"]["status"].startswith("stopped at its cap")


def test_the_full_check_without_a_gpu_stops_at_once_and_says_why(tmp_path):
  proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), f"--out_dir={tmp_path}"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  stages = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
  assert list(stages) == ["environment"]
  assert "no GPU visible to JAX" in stages["environment"]["error"]


@pytest.mark.slow
def test_an_attention_whose_kernels_do_not_compile_is_measured_on_the_xla_path_and_reported(tmp_path):
  # An empty compiler folder: no Triton compiler, so no kernel compiles (what a Triton crash looks like to the run).
  (tmp_path / "no_compiler").mkdir()
  proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--smoke", f"--out_dir={tmp_path}",
                         "--stages=environment,compile,engine", f"--compiler_dir={tmp_path / 'no_compiler'}"],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
  stages = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
  assert stages["compile"]["status"] == "failed" and set(stages["compile"]["failed_kinds"]) == {"dense", "topk", "psa"}
  assert stages["engine"]["status"] == "ok"
  decode = [r for r in stages["engine"]["rows"] if r["part"] == "decode"]
  assert {(r["attention"], r["impl"], r["fallback"]) for r in decode} == {(a, "xla", True) for a in ("dense", "topk", "psa")}
  assert all(r["tokens_per_s"] > 0 for r in decode)
  assert any(n.startswith("psa: measured on the XLA path, its Pallas kernel did not compile (")
             for n in stages["engine"]["notes"])
  assert "fallback: psa attention measured on the XLA path (" in proc.stdout
