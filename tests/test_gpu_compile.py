"""The Pallas kernels compile for the GPUs they are written for: lowered for CUDA and compiled to PTX for Hopper
(sm_90) and Ampere (sm_80) by the Triton compiler XLA:GPU uses, here on a CPU (`make gpu-compiler` installs it)."""

import os
import signal
import subprocess

import pytest

from psa_jax.pallas_kernels import gpu_compile
from psa_jax.serving import compilation

COMPILER = gpu_compile.repo_compiler_dir()


def compiler_dir() -> str:
  assert COMPILER, "no .gpu-compile folder: `make gpu-compiler` installs the Triton compiler the check runs"
  return COMPILER


@pytest.mark.slow
def test_every_attention_kind_compiles_at_its_defaults_for_hopper_and_ampere_in_both_dtypes():
  cases = gpu_compile.default_cases(dtypes=("float32", "bfloat16"))
  rows = gpu_compile.check(cases, gpu_compile.CheckConfig(compiler_dir=compiler_dir()))
  assert gpu_compile.failures(rows) == []
  kernels = {(r["kind"], r["dtype"], r["arch"]): set() for r in rows}
  for r in rows:
    kernels[(r["kind"], r["dtype"], r["arch"])].add(r["kernel"])
  want = {"dense": {"progressive_attention_fixed"},
          "topk": {"block_scores_minmax", "progressive_attention_fixed"},
          "psa": {"block_scores_hybrid", "progressive_attention_value"}}  # the value-aware stop, PSA's default
  assert kernels == {(k, d, a): want[k] for k in want for d in ("float32", "bfloat16") for a in ("sm_90", "sm_80")}
  for r in rows:
    assert 0 < r["smem_bytes"] <= r["smem_limit"] == gpu_compile.ARCHS[r["arch"]].smem_limit
    assert r["registers"] > 0 and r["spill_bytes"] >= 0 and r["ptx_bytes"] > 0  # ptxas assembled the PTX


def test_a_head_dim_that_is_not_a_power_of_two_compiles_padded():
  shape = gpu_compile.KernelShape("phi3_like", q_heads=4, kv_heads=2, head_dim=96)
  cases = [gpu_compile.Case("psa", gpu_compile.PSAConfig(), "bfloat16", shape)]
  rows = gpu_compile.check(cases, gpu_compile.CheckConfig(archs=("sm_90",), compiler_dir=compiler_dir()))
  assert [(r["kernel"], r["status"]) for r in rows] == [("block_scores_hybrid", "ok"),
                                                        ("progressive_attention_value", "ok")]


def test_a_worker_that_dies_mid_run_is_a_failed_row_and_the_run_goes_on():
  cases = gpu_compile.default_cases(dtypes=("bfloat16",))  # dense: 1 kernel, top-k: 2, PSA: 2
  killed = []

  def kill_the_worker_once(row):
    if not killed:
      pids = subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", "gpu_compile"], capture_output=True,
                            text=True).stdout.split()
      for pid in pids:
        os.kill(int(pid), signal.SIGKILL)
      killed.extend(pids)

  rows = gpu_compile.check(cases, gpu_compile.CheckConfig(archs=("sm_90",), compiler_dir=compiler_dir()),
                           progress=kill_the_worker_once)
  assert killed
  # The worker died compiling a kernel (that kernel's row) or lowering a case (lowered again by the next worker):
  # either way every kernel has its row and no other is lost.
  assert [(r["kind"], r["kernel"]) for r in rows] == [
      ("dense", "progressive_attention_fixed"), ("topk", "block_scores_minmax"),
      ("topk", "progressive_attention_fixed"), ("psa", "block_scores_hybrid"), ("psa", "progressive_attention_value")]
  statuses = [r["status"] for r in rows]
  assert statuses.count("ok") >= 4 and set(statuses) <= {"ok", "crashed (signal 9)"}


def test_without_the_triton_compiler_every_kernel_fails_with_what_to_install(tmp_path):
  cases = gpu_compile.default_cases(dtypes=("float32",))[:1]
  rows = gpu_compile.check(cases, gpu_compile.CheckConfig(archs=("sm_90",), compiler_dir=str(tmp_path)))
  assert len(rows) == 1 and "no Triton compiler for CUDA" in rows[0]["status"]
  assert "make gpu-compiler" in gpu_compile.case_status(cases, rows)[0]


def test_a_kernel_the_lowering_refuses_is_reported_per_case():
  # A call the library refuses before lowering (here: heads that do not group) fails its case, with the reason.
  shape = gpu_compile.KernelShape("bad", q_heads=3, kv_heads=2, head_dim=64)
  rows = gpu_compile.check([gpu_compile.Case("dense", gpu_compile.DenseConfig(), "float32", shape)],
                           gpu_compile.CheckConfig(archs=("sm_90",), compiler_dir=compiler_dir()))
  assert [r["kernel"] for r in rows] == ["(lowering)"]
  assert rows[0]["status"].startswith("lowering failed: ValueError: q_heads (3) must be a multiple of kv_heads (2)")


def tiny_engine(**fields):
  import jax.numpy as jnp
  from flax import nnx

  from psa_jax.models.config import ModelConfig
  from psa_jax.models.llama import Decoder
  from psa_jax.serving.engine import Engine
  from tests.tiny_models import engine_config

  config = ModelConfig(arch="llama", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=16, intermediate_size=128, max_context=256)
  return Engine(Decoder(config, dtype=jnp.float32, rngs=nnx.Rngs(0)), None,
                engine_config(attention="psa", max_batch=2, max_context=256, **fields), num_pages=64)


@pytest.mark.slow
def test_the_engine_keeps_the_pallas_kernels_that_compile_for_its_model():
  eng = tiny_engine(impl="pallas")
  lines = []
  moved = compilation.check_kernels(eng, compilation.KernelCheck(when="always", compiler_dir=compiler_dir()),
                                      log=lines.append)
  assert moved == {}
  assert {kind: b.impl for kind, b in eng.runner.backends.items()} == {k: "pallas" for k in ("dense", "topk", "psa")}
  assert lines == [lines[0]] and lines[0].startswith("psa_jax: GPU kernel check for sm_90: 5/5 kernels compiled")


def test_an_attention_whose_kernel_does_not_compile_moves_to_the_xla_path(tmp_path):
  eng = tiny_engine(impl="pallas", dense_layers=1)
  lines = []
  moved = compilation.check_kernels(eng, compilation.KernelCheck(when="always", compiler_dir=str(tmp_path)),
                                      log=lines.append)
  assert set(moved) == {"dense", "topk", "psa"} and all("no Triton compiler" in r for r in moved.values())
  assert {kind: b.impl for kind, b in eng.runner.backends.items()} == {k: "xla" for k in ("dense", "topk", "psa")}
  assert any("the psa attention's Pallas kernel did not compile for sm_90" in line
             and line.endswith("psa attention runs on the XLA path") for line in lines)
  # Only a dense kernel that failed: the sparse kinds whose first layers attend densely move with it.
  eng = tiny_engine(impl="pallas", dense_layers=1)
  moved = compilation.fall_back(eng, {"dense": "crashed (signal 11)"})
  assert set(moved) == {"dense", "topk", "psa"} and moved["psa"] == "its dense layers' kernel: crashed (signal 11)"


def test_off_a_gpu_the_automatic_check_compiles_nothing():
  eng = tiny_engine(impl="pallas")
  assert compilation.check_kernels(eng, compilation.KernelCheck(when="auto"), log=pytest.fail) == {}
  assert {b.impl for b in eng.runner.backends.values()} == {"pallas"}
