"""The GPU check: what to run the moment a GPU is lent, in one command, within a fixed time.

    make gpu-check                 # on the GPU machine: Pallas through Triton, 32K-128K tokens, an 8B-shaped engine
    make gpu-check ARGS=--smoke    # anywhere: tiny shapes, Pallas interpreted (the test suite runs this)

Five stages, each in a process of its own with its own time cap, so a hung compilation costs that stage and
not the run, and each stage gets the whole accelerator (JAX and torch each reserve most of its memory):
  environment  what the machine has; fails in seconds, naming what is missing, before anything compiles.
  compile      the GPU compile check (psa_jax/pallas_kernels/gpu_compile.py): each attention's Pallas kernels at
               its defaults, at the kernel and engine shapes, compiled for this GPU in worker processes, so a
               Triton crash costs a row, not the day. An attention whose kernels fail is measured on the XLA path
               by the stages after it, and the report says so.
  kernels      each Pallas kernel compiled for real, checked against the jnp reference (ragged batches,
               bfloat16 and float32) and timed against the XLA path and the reference; achieved bandwidth for
               the bytes each kernel read (pages visited + block summaries), against the HBM peak.
  engine       the serving engine end to end on a decoder with Llama-3-8B's shapes and random weights: prefill
               tokens/s and time to first token, then decode ms/token and tokens/s for dense, top-k and PSA at
               each context and batch. The batch's sequences are forks of one prefilled prompt, so they share
               its KV pages (as parallel samples do) while each reads them in full.
  torch        the same decoder's dense decode step in PyTorch, scaled_dot_product_attention over a contiguous
               cache: the outside reference on the same GPU.
Results go to `--out_dir` (default $OUT, else ./gpu_check_out): gpu_check.json, gpu_check.png and a table on
stdout. A stage that fails or runs past its cap is reported and the next one runs.

The random decoder's keys are scaled by `--key_scale` so its attention logits spread like a trained model's
(a few heavy tokens over a diffuse background) rather than being near-uniform; the share of the KV that top-k
and PSA read is reported beside each speed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the GPU machine runs the working tree as it is, uninstalled
  sys.path.insert(0, str(REPO))

from absl import app, flags  # noqa: E402

_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny shapes with Pallas interpreted: checks the script on a CPU.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where gpu_check.json and gpu_check.png go (default $OUT).")
_STAGES = flags.DEFINE_list("stages", ["environment", "compile", "kernels", "engine", "torch"],
                            "Stages to run, in order.")
_COMPILER_DIR = flags.DEFINE_string("compiler_dir", None, "Triton compiler wheels for the compile stage (default: "
                                    "the running jax's own on a GPU, the repository's .gpu-compile in --smoke).")
_KEY_SCALE = flags.DEFINE_float("key_scale", 3.0, "Scale of the random decoder's key weights (engine stage).")
_CAPS = flags.DEFINE_list("caps", [], "Time caps to override, as stage=seconds (e.g. engine=300).")
_STAGE = flags.DEFINE_string("stage", None, "Internal: run one stage in this process.")

STAGES = ("environment", "compile", "kernels", "engine", "torch")
HBM_BYTES_PER_S = 4.8e12  # the H200's HBM3e peak


@dataclasses.dataclass(frozen=True)
class Profile:
  """Shapes and time caps of one run."""

  caps_s: dict  # stage -> seconds
  kernel_contexts: tuple[int, ...]
  kernel_batch: int
  q_heads: int
  kv_heads: int
  head_dim: int
  repeats: int
  engine_model: dict  # ModelConfig fields
  engine_contexts: tuple[int, ...]  # the longest first: it compiles every table width the others use
  engine_batches: tuple[int, ...]
  decode_steps: int
  decode_window: int
  prefill_chunk: int
  topk_blocks: int
  interpret: bool
  timed_impls: tuple[str, ...] = ("pallas", "xla", "reference")  # the smoke run times fewer, to stay quick


# Llama-3-8B: 32 layers, hidden 4096, 32 query heads over 8 KV heads of 128, MLP 14336, vocab 128256.
LLAMA3_8B = dict(arch="llama", vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                 head_dim=128, intermediate_size=14336, rope_theta=500000.0, max_context=131072 + 1024)

GPU = Profile(
    caps_s={"environment": 60, "compile": 60, "kernels": 140, "engine": 230, "torch": 50},  # 9 minutes in all
    kernel_contexts=(32768, 65536, 131072), kernel_batch=4, q_heads=32, kv_heads=8, head_dim=128, repeats=10,
    engine_model=LLAMA3_8B, engine_contexts=(131072, 32768), engine_batches=(1, 16), decode_steps=32,
    decode_window=16, prefill_chunk=8192, topk_blocks=64, interpret=False)

SMOKE = Profile(
    caps_s={"environment": 120, "compile": 120, "kernels": 300, "engine": 300, "torch": 120},
    kernel_contexts=(300,), kernel_batch=3, q_heads=4, kv_heads=2, head_dim=32, repeats=1,
    engine_model=dict(arch="llama", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, intermediate_size=128, max_context=1024),
    engine_contexts=(300,), engine_batches=(2,), decode_steps=8, decode_window=8, prefill_chunk=128,
    topk_blocks=4, interpret=True, timed_impls=("pallas",))

# What the stages import. The GPU machine's python has all but the last few (see `make gpu-wheels`).
REQUIRED = ("jax", "jaxlib", "flax", "chex", "absl", "numpy", "tokenizers", "jinja2", "tqdm", "safetensors",
            "matplotlib")
FOR_SERVING = ("gguf", "fastapi", "uvicorn", "prometheus_client", "httpx")  # reported, not needed here


def profile() -> Profile:
  return SMOKE if _SMOKE.value else GPU


class Recorder:
  """A stage's results, rewritten to disk after every row so a stage killed at its cap keeps what it measured."""

  def __init__(self, out_dir: pathlib.Path, stage: str):
    self.path = out_dir / f"stage_{stage}.json"
    self.data = {"stage": stage, "status": "running", "rows": [], "notes": []}
    self.flush()

  def row(self, **row):
    self.data["rows"].append(row)
    print("  " + "  ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
    self.flush()

  def note(self, text: str):
    self.data["notes"].append(text)
    print(f"  note: {text}", flush=True)
    self.flush()

  def set(self, **fields):
    self.data.update(fields)
    self.flush()

  def flush(self):
    self.path.write_text(json.dumps(self.data, indent=1, default=str))


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


# ------------------------------------------------------------------------------------------------ environment

def stage_environment(rec: Recorder, p: Profile) -> None:
  missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
  rec.set(python=sys.version.split()[0], missing=missing,
          serving_missing=[m for m in FOR_SERVING if importlib.util.find_spec(m) is None],
          torch=importlib.util.find_spec("torch") is not None)
  if missing:
    raise SystemExit(f"missing Python packages: {', '.join(missing)}. Build them here with `make gpu-wheels` "
                     f"and carry .gpu-wheels; `make gpu-check` installs them with pip --no-index")
  import jax
  rec.set(jax=jax.__version__, backend=jax.default_backend(), devices=[str(d) for d in jax.devices()])
  if not p.interpret and jax.default_backend() != "gpu":
    raise SystemExit(f"no GPU visible to JAX (backend {jax.default_backend()!r}); on a CPU run --smoke")
  from psa_jax.bench import common
  rec.set(machine=common.machine())
  import psa_jax  # noqa: F401  the package imports cleanly on this jax
  from psa_jax.serving import engine  # noqa: F401


# ---------------------------------------------------------------------------------------------------- compile

def stage_compile(rec: Recorder, p: Profile, compiler_dir: str | None) -> None:
  from psa_jax.pallas_kernels import gpu_compile
  from psa_jax.serving.compilation import _device_arch

  arch = _device_arch()
  shapes = {(p.q_heads, p.kv_heads, p.head_dim)}
  m = p.engine_model
  shapes.add((m["num_heads"], m["num_kv_heads"], m["head_dim"]))
  cases = [gpu_compile.Case(kind, config(), dtype, gpu_compile.KernelShape(f"{hq}/{hk}x{d}", hq, hk, d))
           for hq, hk, d in sorted(shapes) for dtype in ("bfloat16", "float32")
           for kind, config in gpu_compile.KIND_CONFIGS.items()]
  rec.set(arch=arch, compiler_dir=compiler_dir)
  rows = gpu_compile.check(cases, gpu_compile.CheckConfig(archs=(arch,), compiler_dir=compiler_dir),
                           progress=lambda r: rec.row(**{k: r.get(k) for k in (
                               "kind", "dtype", "shape", "kernel", "arch", "status", "smem_bytes", "registers",
                               "spill_bytes")}))
  failed = {}
  for case, status in zip(cases, gpu_compile.case_status(cases, rows)):
    if status and case.kind not in failed:
      failed[case.kind] = status
  rec.set(failed_kinds=failed)
  if failed:
    raise SystemExit(f"kernels that do not compile for {arch}: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))


def failed_kinds(out_dir: pathlib.Path) -> dict[str, str]:
  """The compile stage's verdict: attention kind -> why its Pallas kernels did not compile ({} if it did not run)."""
  path = out_dir / "stage_compile.json"
  return json.loads(path.read_text()).get("failed_kinds", {}) if path.exists() else {}


# ---------------------------------------------------------------------------------------------------- kernels

def planted_inputs(seed: int, lengths, *, q_heads, kv_heads, head_dim, dtype, block_size=16, heavy=8,
                   strength=2.0):
  """Paged decode inputs generated on the device (128K-token caches are too slow to draw on the host): random
  keys and values with a sink, a local block and `heavy` random blocks per sequence leaning towards its queries.
  Returns (q [B, Hq, D], k_pages, v_pages [H, P, S, D], table [B, M], lengths [B], summaries)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from psa_jax.pallas_kernels.summaries import BlockSummaries, update_summaries

  rng = np.random.default_rng(seed)
  lengths = np.asarray(lengths, np.int32)
  blocks = -(-lengths // block_size)
  width, num_pages = int(blocks.max()), int(blocks.sum()) + 1
  perm = rng.permutation(num_pages)
  table = np.zeros((len(lengths), width), np.int32)
  start = 0
  for b, n in enumerate(blocks):
    table[b, :n] = perm[start:start + n]
    start += n
  kq, kk, kv_ = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (len(lengths), q_heads, head_dim), jnp.float32)
  k = jax.random.normal(kk, (kv_heads, num_pages, block_size, head_dim), dtype)
  v = jax.random.normal(kv_, (kv_heads, num_pages, block_size, head_dim), dtype)
  direction = q.reshape(len(lengths), kv_heads, -1, head_dim).mean(axis=2)
  direction = direction / (jnp.linalg.norm(direction, axis=-1, keepdims=True) + 1e-6)  # [B, H, D]
  pages, dirs = [], []
  for b, n in enumerate(blocks):
    chosen = {0, int(n) - 1} | set(rng.choice(int(n), size=min(heavy, int(n)), replace=False).tolist())
    pages += [int(table[b, j]) for j in sorted(chosen)]
    dirs += [b] * len(chosen)
  lean = strength * np.sqrt(head_dim) * rng.uniform(0.5, 1.0, len(pages))
  push = direction[np.asarray(dirs)].transpose(1, 0, 2) * jnp.asarray(lean, jnp.float32)[None, :, None]
  k = k.at[:, np.asarray(pages)].add(push[:, :, None, :].astype(dtype))
  counts = np.clip(lengths[:, None] - np.arange(width)[None, :] * block_size, 0, block_size)
  summaries = update_summaries(BlockSummaries.zeros(kv_heads, num_pages, head_dim, dtype), k, v,
                               jnp.asarray(table.reshape(-1)), jnp.asarray(counts.reshape(-1)))
  return q.astype(dtype), k, v, jnp.asarray(table), jnp.asarray(lengths), summaries


def _median_ms(fn, x, repeats):
  import statistics
  import jax
  jax.block_until_ready(fn(x))  # compile
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(x))
    times.append(time.perf_counter() - t)
  return statistics.median(times) * 1e3


def stage_kernels(rec: Recorder, p: Profile, failed: dict[str, str]) -> None:
  import functools
  import jax
  import jax.numpy as jnp
  import numpy as np
  from psa_jax import PSAConfig, TopKConfig, dense_attention, psa_attention, topk_attention
  from psa_jax.pallas_kernels import stopping

  topk, psa = TopKConfig(k_blocks=p.topk_blocks), PSAConfig()
  calls = {
      "dense": lambda x, impl: (dense_attention(*x[:5], impl=impl, interpret=p.interpret), None),
      "topk": lambda x, impl: topk_attention(*x, topk, impl=impl, interpret=p.interpret),
      "psa": lambda x, impl: psa_attention(*x, psa, impl=impl, interpret=p.interpret),
  }
  score_rows = {"minmax": 2, "mean": 1, "hybrid": 3}
  summary_rows = {"dense": 0, "topk": score_rows[topk.score],
                  "psa": score_rows[psa.score] + stopping.needs_values(psa.estimator, psa.compensate)}
  failures = 0
  for context in p.kernel_contexts:
    for dtype in (jnp.bfloat16, jnp.float32):
      lengths = [context - 7 * i for i in range(p.kernel_batch)]  # ragged, not block-aligned
      x = planted_inputs(0, lengths, q_heads=p.q_heads, kv_heads=p.kv_heads, head_dim=p.head_dim, dtype=dtype)
      item = jnp.dtype(dtype).itemsize
      n_blocks = int(np.sum(-(-np.asarray(lengths) // 16)))
      for kind, call in calls.items():
        if kind in failed:  # its kernel does not compile: running it would cost the stage
          failures += 1
          rec.row(context=context, dtype=jnp.dtype(dtype).name, kind=kind, ok=False,
                  pallas=f"not run: {failed[kind]}")
          continue
        fns = {impl: jax.jit(functools.partial(call, impl=impl)) for impl in ("pallas", "xla", "reference")}  # compiled on first call
        got, used = fns["pallas"](x)
        want, want_used = fns["reference"](x)
        err = jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)), axis=(1, 2))  # [B]
        if used is None:
          same = np.ones(len(lengths), bool)
          blocks_read = n_blocks * p.kv_heads
        else:
          same = np.asarray(jnp.all(used == want_used, axis=1))
          blocks_read = int(jnp.sum(used))
        # The rows whose block choices agree must agree in output; on a GPU a threshold decision can flip on a
        # rounding difference, so a few rows may read one chunk more or less than the reference.
        max_err = float(jnp.max(jnp.where(jnp.asarray(same), err, 0.0)))
        tol = 2e-2 if dtype == jnp.bfloat16 else 1e-3
        ok = max_err <= tol and same.mean() >= (1.0 if p.interpret else 0.9)
        failures += not ok
        nbytes = blocks_read * 16 * p.head_dim * 2 * item + n_blocks * p.kv_heads * p.head_dim * item * summary_rows[kind]
        ms = {impl: _median_ms(fns[impl], x, p.repeats) if impl in p.timed_impls else None
              for impl in ("pallas", "xla", "reference")}
        rec.row(context=context, dtype=jnp.dtype(dtype).name, kind=kind, ok=ok, max_err=max_err,
                rows_same_blocks=float(same.mean()), kv_share=blocks_read / (n_blocks * p.kv_heads),
                pallas_ms=ms["pallas"], xla_ms=ms["xla"], reference_ms=ms["reference"],
                bytes_read=nbytes, pallas_tb_per_s=nbytes / ms["pallas"] / 1e9,
                hbm_share=nbytes / (ms["pallas"] / 1e3) / HBM_BYTES_PER_S)
      del x
  if failures:
    raise SystemExit(f"{failures} kernel checks out of tolerance")


# ----------------------------------------------------------------------------------------------------- engine

def random_decoder(p: Profile, key_scale: float):
  import jax.numpy as jnp
  from flax import nnx
  from psa_jax.models.config import ModelConfig
  from psa_jax.models.llama import Decoder

  model = Decoder(ModelConfig(**p.engine_model), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  model.wk[...] = (model.wk[...] * key_scale).astype(model.wk[...].dtype)
  return model


def stage_engine(rec: Recorder, p: Profile, key_scale: float, failed: dict[str, str]) -> None:
  import numpy as np
  from psa_jax.bench.e2e import prefill_and_hold, timed_decode
  from psa_jax.serving.config import AttentionDefaults, CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
  from psa_jax.serving.engine import Engine

  t0 = time.perf_counter()
  model = random_decoder(p, key_scale)
  c = model.config
  rec.note(f"random decoder {c.num_layers}x{c.hidden_size}, {c.num_heads}/{c.num_kv_heads} heads of "
           f"{c.head_dim}, vocab {c.vocab_size}, key_scale {key_scale}: built in {time.perf_counter() - t0:.1f} s")
  window = p.decode_window
  extra = window * (2 + -(-p.decode_steps // window)) + 16
  longest = max(p.engine_contexts) + extra
  blocks = -(-longest // 16) + 1
  num_pages = c.num_layers * (blocks + 2 * max(p.engine_batches) + 8)  # one prompt, shared by the forks
  engine = Engine(model, None, EngineConfig(
      attention=AttentionDefaults(kind="dense", topk_blocks=p.topk_blocks), cache=CacheConfig(max_context=longest),
      scheduler=SchedulerConfig(max_batch=max(p.engine_batches), decode_window=window,
                                prefill_chunk=p.prefill_chunk),
      parallel=ParallelConfig(mesh="none")), num_pages=num_pages)
  from psa_jax.attention import resolve_impl
  from psa_jax.serving.compilation import fall_back
  moved = fall_back(engine, failed)
  for kind, reason in moved.items():
    rec.note(f"{kind}: measured on the XLA path, its Pallas kernel did not compile ({reason})")
  impl = {kind: resolve_impl(b.impl) for kind, b in engine.runner.backends.items()}
  rng = np.random.default_rng(0)
  for i, context in enumerate(p.engine_contexts):
    prompt = rng.integers(0, c.vocab_size, context).tolist()
    base, ttft = prefill_and_hold(engine, prompt, extra)
    rec.row(part="prefill", context=context, ttft_s=ttft, prefill_tok_per_s=context / ttft,
            includes_compilation=i == 0)
    for batch in p.engine_batches:
      for attention in ("dense", "topk", "psa"):
        r = timed_decode(engine, base, attention, batch, p.decode_steps)
        rec.row(part="decode", context=context, batch=batch, attention=attention, impl=impl[attention],
                fallback=attention in moved, ms_per_token=r["ms_per_token"],
                tokens_per_s=r["tokens_per_s"], kv_share_read=r["kv_share_read"])
    engine.cancel(base.id)
    engine.step()
  engine.arena.check_whole()


# ------------------------------------------------------------------------------------------------------ torch

def stage_torch(rec: Recorder, p: Profile) -> None:
  import importlib
  if importlib.util.find_spec("torch") is None:
    rec.note("torch is not installed: no outside reference")
    return
  import torch
  import torch.nn.functional as F

  device = "cuda" if torch.cuda.is_available() and not p.interpret else "cpu"
  dtype = torch.bfloat16
  m = p.engine_model
  e, l, hq, hk, d, f, vocab = (m["hidden_size"], m["num_layers"], m["num_heads"], m["num_kv_heads"],
                               m["head_dim"], m["intermediate_size"], m["vocab_size"])
  rec.set(torch=torch.__version__, device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
  g = torch.Generator(device=device).manual_seed(0)
  w = lambda *shape: 0.02 * torch.randn(*shape, generator=g, device=device, dtype=dtype)
  layers = [dict(wqkv=w(e, (hq + 2 * hk) * d), wo=w(hq * d, e), w13=w(e, 2 * f), w2=w(f, e)) for _ in range(l)]
  embed, head = w(vocab, e), w(e, vocab)

  def sync():
    if device == "cuda":
      torch.cuda.synchronize()

  def timed(fn, repeats):
    fn()
    sync()
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      fn()
      sync()
      times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3

  for context in p.engine_contexts:
    for batch in p.engine_batches:
      # One cache read by every layer: the same bytes per layer as 32 caches, in 1/32 of the memory.
      k = torch.randn(batch, hk, context, d, generator=g, device=device, dtype=dtype)
      v = torch.randn(batch, hk, context, d, generator=g, device=device, dtype=dtype)
      q = torch.randn(batch, hq, 1, d, generator=g, device=device, dtype=dtype)
      attn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
      attn_ms = timed(attn, p.repeats)
      tokens = torch.zeros(batch, dtype=torch.long, device=device)

      @torch.inference_mode()
      def step():
        x = embed[tokens]
        for lw in layers:
          h = F.rms_norm(x, (e,))
          qkv = h @ lw["wqkv"]
          qh = qkv[:, : hq * d].view(batch, hq, 1, d)
          a = F.scaled_dot_product_attention(qh, k, v, enable_gqa=True)
          x = x + a.reshape(batch, hq * d) @ lw["wo"]
          gate, up = (F.rms_norm(x, (e,)) @ lw["w13"]).chunk(2, dim=-1)
          x = x + (F.silu(gate) * up) @ lw["w2"]
        return F.rms_norm(x, (e,)) @ head

      step_ms = timed(step, p.repeats)
      nbytes = 2 * k.numel() * k.element_size()
      rec.row(context=context, batch=batch, attention="torch_sdpa", sdpa_ms=attn_ms,
              sdpa_tb_per_s=nbytes / attn_ms / 1e9, ms_per_token=step_ms, tokens_per_s=1e3 * batch / step_ms)
      del k, v


# ----------------------------------------------------------------------------------------------- orchestration

def compiler_dir() -> str | None:
  if _COMPILER_DIR.value:
    return _COMPILER_DIR.value
  if _SMOKE.value:  # no GPU, so no Triton compiler in jax: the one `make gpu-compiler` installs
    from psa_jax.pallas_kernels.gpu_compile import repo_compiler_dir
    return repo_compiler_dir()
  return None


def run_stage(stage: str, out_dir: pathlib.Path) -> None:
  """One stage, in this process."""
  p = profile()
  rec = Recorder(out_dir, stage)
  print(f"== {stage}", flush=True)
  start = time.perf_counter()
  try:
    if stage == "environment":
      stage_environment(rec, p)
    elif stage == "compile":
      stage_compile(rec, p, compiler_dir())
    elif stage == "kernels":
      stage_kernels(rec, p, failed_kinds(out_dir))
    elif stage == "engine":
      stage_engine(rec, p, _KEY_SCALE.value, failed_kinds(out_dir))
    else:
      stage_torch(rec, p)
  except SystemExit as e:
    rec.set(status="failed", error=str(e), seconds=time.perf_counter() - start)
    raise
  except Exception as e:
    rec.set(status="failed", error=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - start)
    raise
  rec.set(status="ok", seconds=time.perf_counter() - start)


def orchestrate(out_dir: pathlib.Path) -> int:
  p = profile()
  caps = {}
  for item in _CAPS.value:
    stage, _, seconds = item.partition("=")
    if stage not in STAGES or not seconds:
      raise SystemExit(f"--caps takes stage=seconds with a stage of {STAGES}, got {item!r}")
    caps[stage] = float(seconds)
  results, started = {}, time.perf_counter()
  for stage in _STAGES.value:
    if stage not in STAGES:
      raise SystemExit(f"unknown stage {stage!r}; stages: {STAGES}")
    cmd = [sys.executable, __file__, f"--stage={stage}", f"--out_dir={out_dir}", f"--key_scale={_KEY_SCALE.value}"]
    cmd += ["--smoke"] if _SMOKE.value else []
    cmd += [f"--compiler_dir={_COMPILER_DIR.value}"] if _COMPILER_DIR.value else []
    cap = caps.get(stage, p.caps_s[stage])
    path = out_dir / f"stage_{stage}.json"
    path.unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
      proc.wait(timeout=cap)
      timed_out = False
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
      timed_out = True
    data = json.loads(path.read_text()) if path.exists() else {"stage": stage, "rows": [], "notes": []}
    if timed_out:
      data["status"] = f"stopped at its cap of {cap:g} s"
    elif data.get("status") in (None, "running"):
      data["status"] = f"failed (exit {proc.returncode})"
    results[stage] = data
    print(f"== {stage}: {data['status']}" + (f" ({data['error']})" if data.get("error") else ""), flush=True)
    if stage == "environment" and data["status"] != "ok":
      break  # nothing else can run
  summary = {"profile": "smoke" if _SMOKE.value else "gpu", "seconds": time.perf_counter() - started,
             "stages": results, "command": " ".join(sys.argv)}
  (out_dir / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str))
  report(results, out_dir)
  print(f"wrote {out_dir / 'gpu_check.json'} in {summary['seconds']:.0f} s", flush=True)
  return 0 if all(r["status"] == "ok" for r in results.values()) else 1


def report(results: dict, out_dir: pathlib.Path) -> None:
  """Prints the tables and draws kernel bandwidth and decode throughput side by side."""
  from psa_jax.bench import common

  env = results.get("environment", {})
  print(f"\nmachine: {env.get('machine')}  python {env.get('python')}  torch: {results.get('torch', {}).get('torch')}")
  compiled = results.get("compile", {}).get("rows", [])
  if compiled:
    print("\n" + common.table(compiled, ["kind", "dtype", "shape", "kernel", "arch", "status", "smem_bytes",
                                          "registers", "spill_bytes"]))
  for kind, reason in results.get("compile", {}).get("failed_kinds", {}).items():
    print(f"fallback: {kind} attention measured on the XLA path ({reason})")
  kernels = results.get("kernels", {}).get("rows", [])
  if kernels:
    print("\n" + common.table(kernels, ["context", "dtype", "kind", "ok", "max_err", "rows_same_blocks", "kv_share",
                                         "pallas_ms", "xla_ms", "reference_ms", "pallas_tb_per_s", "hbm_share"]))
  engine = results.get("engine", {}).get("rows", [])
  prefill = [r for r in engine if r.get("part") == "prefill"]
  decode = [r for r in engine if r.get("part") == "decode"] + results.get("torch", {}).get("rows", [])
  if prefill:
    print("\n" + common.table(prefill, ["context", "ttft_s", "prefill_tok_per_s", "includes_compilation"]))
  if decode:
    print("\n" + common.table(decode, ["context", "batch", "attention", "impl", "ms_per_token", "tokens_per_s",
                                        "kv_share_read"]))
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
  for kind in ("dense", "topk", "psa"):
    rows = [r for r in kernels if r["kind"] == kind and r["dtype"] == "bfloat16" and "hbm_share" in r]
    ax1.plot([r["context"] for r in rows], [r["hbm_share"] for r in rows], "o-", label=kind)
  ax1.set(xscale="log", xlabel="context (tokens)", ylabel="share of HBM peak", title="Pallas kernels, bfloat16")
  labels = sorted({(r["context"], r["batch"]) for r in decode})
  for i, kind in enumerate(("dense", "topk", "psa", "torch_sdpa")):
    values = [next((r["tokens_per_s"] for r in decode if (r["context"], r["batch"]) == lb and r["attention"] == kind),
                   0.0) for lb in labels]
    ax2.bar([j + 0.2 * i for j in range(len(labels))], values, width=0.2, label=kind)
  ax2.set_xticks([j + 0.3 for j in range(len(labels))], [f"{c // 1024}K x{b}" for c, b in labels])
  ax2.set(ylabel="decode tokens / s", title="Engine decode (context x batch)")
  for ax in (ax1, ax2):
    ax.legend()
  fig.tight_layout()
  fig.savefig(out_dir / "gpu_check.png", dpi=120)


def main(argv):
  del argv
  out_dir = pathlib.Path(_OUT_DIR.value or os.environ.get("OUT") or "gpu_check_out")
  out_dir.mkdir(parents=True, exist_ok=True)
  if _STAGE.value:
    run_stage(_STAGE.value, out_dir)
    return 0
  return orchestrate(out_dir)


if __name__ == "__main__":
  app.run(main)
