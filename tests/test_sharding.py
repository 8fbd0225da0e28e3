"""Sharded serving (psa_jax/models/parallel.py) on forced host devices: the same greedy text on every mesh, and no
all-gather of the KV arena in the compiled decode step.

A process fixes its device count when JAX starts, so each check runs in a fresh interpreter with
XLA_FLAGS=--xla_force_host_platform_device_count=8; the `_scenario_*` functions below are what it runs.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import socket
import subprocess
import sys

import pytest

from psa_jax.models.config import ModelConfig
from psa_jax.models.parallel import MeshConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]

# 8 KV heads, so every mesh of up to 8 devices can split them.
WIDE = ModelConfig(arch="llama", vocab_size=256, hidden_size=64, num_layers=2, num_heads=16, num_kv_heads=8,
                   head_dim=8, intermediate_size=128, max_context=256, eos_token_ids=(3,))
PROMPTS = [[5, 9, 17, 4, 30], list(range(4, 40)), [(7 * i) % 250 + 4 for i in range(70)]]


def _start(scenario: str, devices: int | None = 8, **kwargs) -> subprocess.Popen:
  code = (f"import json, tests.test_sharding as t\n"
          f"print('RESULT ' + json.dumps(t.{scenario}(**{kwargs!r})))")
  env = dict(os.environ, PSA_JAX_QUIET="1")
  # Not the run's shared compilation cache: two processes of one multi-host run that meet it in different
  # states (one loads a program, the other compiles it) were seen to hang in step.
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  if devices:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen):
  stdout, stderr = proc.communicate(timeout=900)
  assert proc.returncode == 0, stderr[-6000:]
  line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
  return json.loads(line.removeprefix("RESULT "))


def _in_subprocess(scenario: str, devices: int = 8, **kwargs):
  return _result(_start(scenario, devices, **kwargs))


def _greedy_on_meshes(model, meshes, prompts, max_tokens, kinds=("dense", "psa")):
  """{mesh: {attention: greedy tokens per prompt}}, one engine per mesh serving requests of each kind."""
  import jax.numpy as jnp
  from flax import nnx

  from psa_jax.serving.config import SamplingParams
  from psa_jax.serving.engine import Engine
  from tests.tiny_models import engine_config

  results = {}
  for mesh in meshes:
    engine = Engine(nnx.clone(model), None, engine_config(
        mesh=mesh, max_batch=8, kv_memory="16MiB", max_context=min(1024, model.config.max_context),
        decode_window=4, prefill_chunk=32, psa_tau=0.9))
    assert engine.arena.kv.k.dtype == jnp.float32
    params = SamplingParams(max_tokens=max_tokens, stop_token_ids=())
    results[mesh] = {kind: engine.generate(prompts, params, attention=kind) for kind in kinds}
    engine.arena.check_whole()
  return results


def _scenario_wide_model(meshes):
  import jax.numpy as jnp
  from flax import nnx

  from psa_jax.models.llama import Decoder

  return _greedy_on_meshes(Decoder(WIDE, dtype=jnp.float32, rngs=nnx.Rngs(3)), meshes, PROMPTS, 10)


def _scenario_default_model(meshes):
  import jax.numpy as jnp

  from psa_jax.models import checkpoint

  lm = checkpoint.load(None, dtype=jnp.float32)
  prompts = [lm.tokenizer.encode(text) for text in (
      "The capital of France is", "def fibonacci(n):\n    ", "List three colours of the rainbow, then explain " * 6)]
  return _greedy_on_meshes(lm.model, meshes, prompts, 6, kinds=("psa",))  # dense on meshes: the wide model


def _scenario_one_of_two_processes(process_id, port, mesh):
  """One host of a two-host run (two CPU devices each), joined through jax.distributed."""
  import jax

  from psa_jax.models.parallel import initialize_distributed

  jax.config.update("jax_num_cpu_devices", 2)
  initialize_distributed(f"127.0.0.1:{port}", 2, process_id)
  assert len(jax.devices()) == 4 and len(jax.local_devices()) == 2
  return _scenario_wide_model([mesh])[mesh]


def _scenario_decode_hlo(mesh):
  """The compiled decode window of the WIDE model on `mesh`: its collectives and its arena parameter."""
  import jax.numpy as jnp
  from flax import nnx

  from psa_jax.models.llama import Decoder
  from psa_jax.serving import steps
  from psa_jax.serving.config import SamplingParams
  from psa_jax.serving.engine import Engine
  from tests.tiny_models import engine_config

  engine = Engine(Decoder(WIDE, dtype=jnp.float32, rngs=nnx.Rngs(3)), None,
                  engine_config(mesh=mesh, max_batch=8, kv_memory="4MiB", max_context=256, attention="psa"))
  calls = []
  decode_window = steps.decode_window
  steps.decode_window = lambda *a, **k: calls.append((a, k)) or decode_window(*a, **k)
  try:
    engine.generate(PROMPTS, SamplingParams(max_tokens=4))
  finally:
    steps.decode_window = decode_window
  args, kwargs = calls[-1]
  hlo = decode_window.lower(*args, **kwargs).compile().as_text()
  collectives = [(m.group(2), m.group(1)) for m in re.finditer(
      r"= \(?([a-z0-9]+\[[0-9,]*\])[^=]*? (all-gather|all-reduce|all-to-all|collective-permute)\(", hlo)]
  return {"collectives": collectives, "num_pages": engine.arena.num_pages, "hlo_has_local_arena":
          f"f32[{WIDE.num_kv_heads // MeshConfig.parse(mesh).model},{engine.arena.num_pages},16,8]" in hlo}


def test_mesh_spec_parses_and_rejects_bad_spellings():
  assert MeshConfig.parse("data=2,model=4") == MeshConfig(data=2, model=4)
  assert MeshConfig.parse("model=3") == MeshConfig(data=1, model=3)
  for bad in ("data=2,data=2", "model=0", "tensor=2", "data=2;model=4"):
    with pytest.raises(ValueError):
      MeshConfig.parse(bad)


def test_default_mesh_puts_devices_on_the_model_axis_where_heads_divide():
  smollm = ModelConfig(arch="llama", vocab_size=8, hidden_size=576, num_layers=1, num_heads=9, num_kv_heads=3,
                       head_dim=64, intermediate_size=1536, max_context=8)
  assert MeshConfig.default(8, WIDE) == MeshConfig(data=1, model=8)
  assert MeshConfig.default(3, smollm) == MeshConfig(data=1, model=3)
  assert MeshConfig.default(6, smollm) == MeshConfig(data=2, model=3)
  assert MeshConfig.default(8, smollm) == MeshConfig(data=8, model=1)
  with pytest.raises(ValueError, match="must divide the KV heads"):
    MeshConfig(model=2).check(smollm, 8)
  with pytest.raises(ValueError, match="needs 16 devices"):
    MeshConfig(data=2, model=8).check(WIDE, 8)


@pytest.mark.slow
def test_wide_model_greedy_text_is_the_same_on_every_mesh():
  # Both axes at once; data=2,model=2 runs in the two-process test below, model=3 in the default model's test.
  meshes = ["none", "data=2,model=4"]
  results = _in_subprocess("_scenario_wide_model", meshes=meshes)
  for mesh in meshes[1:]:
    assert results[mesh] == results["none"], mesh


@pytest.mark.slow
def test_default_model_greedy_text_is_the_same_on_every_mesh():
  # Its 3 KV heads allow model=3 at most; data axes and wider model axes are covered by the wide model above (the
  # 135M model costs ~20 s per mesh on two cores).
  meshes = ["none", "model=3"]
  results = _in_subprocess("_scenario_default_model", devices=3, meshes=meshes)
  for mesh in meshes[1:]:
    assert results[mesh] == results["none"], mesh
  assert all(len(tokens) == 6 for tokens in results["none"]["psa"])


@pytest.mark.slow
def test_two_processes_serve_in_step_and_match_one_device():
  with socket.socket() as sock:  # a free port for the coordinator
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  hosts = [_start("_scenario_one_of_two_processes", None, process_id=i, port=port, mesh="data=2,model=2")
           for i in range(2)]
  alone = _in_subprocess("_scenario_wide_model", devices=1, meshes=["none"])["none"]
  for host in hosts:
    assert _result(host) == alone


def _scenario_split_weights_on_a_mesh():
  import jax.numpy as jnp
  from flax import nnx

  from psa_jax.models.llama import Decoder
  from tests.tiny_models import engine_config
  from psa_jax.serving.engine import Engine
  model = Decoder(WIDE, dtype=jnp.float32, rngs=nnx.Rngs(0))
  config = dict(mesh="data=2,model=4", kv_memory="4MiB", max_context=256)
  try:
    Engine(model, None, engine_config(layer_weights="split", **config))
    error = None
  except ValueError as e:
    error = str(e)
  return {"error": error, "auto_splits": Engine(model, None, engine_config(**config)).splits_layers}


def test_split_layer_weights_are_refused_on_a_mesh_and_auto_keeps_them_stacked():
  out = _in_subprocess("_scenario_split_weights_on_a_mesh")
  assert out["error"] and "one device only" in out["error"]
  assert out["auto_splits"] is False


@pytest.mark.slow
def test_decode_step_never_gathers_the_kv_arena():
  out = _in_subprocess("_scenario_decode_hlo", mesh="data=2,model=4")
  assert out["hlo_has_local_arena"], "each device should hold a [KV heads / 4, pages, 16, 8] shard of the arena"
  kinds = {kind for kind, _ in out["collectives"]}
  assert "all-reduce" in kinds  # tensor parallel: partial sums after the row-split projections
  for kind, shape in out["collectives"]:
    dims = [int(x) for x in re.findall(r"\d+", shape.split("[", 1)[1])]
    # The arena (and even one KV head's page pool) never moves: only new rows, tables and activations do.
    assert out["num_pages"] not in dims and math.prod(dims) < out["num_pages"], (kind, shape)
