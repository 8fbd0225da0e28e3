"""The GPU compile check: every Pallas kernel compiled for NVIDIA GPUs, on any machine, with or without a GPU.

Compiling a Pallas kernel for a GPU takes two steps, and neither needs a GPU:
  1. Pallas to Triton IR: `jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))` runs the Pallas-to-Triton
     lowering, with the MLIR verifier, on a CPU-only jaxlib. Unsupported operations and non-power-of-two tiles
     fail here.
  2. Triton IR to PTX: the Triton compiler that XLA:GPU runs, which the `jax-cuda12-plugin` wheels register with
     `jax._src.lib.triton` once JAX has loaded its plugins (also with JAX_PLATFORMS=cpu). `ptxas` (from the
     `nvidia-cuda-nvcc-cu12` wheel) then assembles the PTX and reports registers and spills.
The Triton compiler can crash the process (a segfault in a layout pass) instead of raising, so every compile
runs in a worker process (`python -m psa_jax.pallas_kernels.gpu_compile JOBS`): a crash is a failed row, the
parent starts a new worker on the next module, and the run goes on.

What a compiled row proves: the kernel as the library builds it, at these shapes and dtypes, lowers and compiles
for that architecture, within its shared memory. What it does not: that the results are right or fast (only a
GPU run shows that: scripts/gpu_check.py), or that another Triton compiles it the same way (the lent GPU machine
runs a newer jax, whose Triton differs). docs/design.md has the details.

Shapes: B batch, Hq query heads, H kv heads, D head_dim, S block size, M blocks per sequence, P pages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterable, Sequence

from psa_jax.config import DenseConfig, PSAConfig, TopKConfig
from psa_jax.pallas_kernels.stopping import ESTIMATORS, TAILS
from psa_jax.pallas_kernels.summaries import SCORE_KINDS

KIND_CONFIGS = {"dense": DenseConfig, "topk": TopKConfig, "psa": PSAConfig}


@dataclasses.dataclass(frozen=True)
class Arch:
  """A GPU architecture: Triton's name for it, ptxas's, and the most shared memory one block may use."""

  name: str
  triton: str
  smem_limit: int  # bytes, with the opt-in carve-out


ARCHS = {
    "sm_90": Arch("sm_90", "9.0", 227 * 1024),  # H100, H200
    "sm_80": Arch("sm_80", "8.0", 163 * 1024),  # A100
    "sm_86": Arch("sm_86", "8.6", 99 * 1024),  # A10, RTX 30
    "sm_89": Arch("sm_89", "8.9", 99 * 1024),  # L4, L40, RTX 40
    "sm_100": Arch("sm_100", "10.0", 227 * 1024),  # B200
}


def arch_for(compute_capability: str) -> Arch:
  """The Arch of a device's compute capability ("9.0"); one not listed above gets the smallest limit above."""
  for arch in ARCHS.values():
    if arch.triton == str(compute_capability):
      return arch
  return Arch(f"sm_{str(compute_capability).replace('.', '')}", str(compute_capability), 99 * 1024)


def arch_named(name: str) -> Arch:
  """ARCHS[name], or the architecture an "sm_NN" name spells."""
  if name in ARCHS:
    return ARCHS[name]
  match = re.fullmatch(r"sm_(\d+)(\d)", name)
  if not match:
    raise ValueError(f"an architecture is one of {tuple(ARCHS)} or sm_NN, got {name!r}")
  return arch_for(f"{match.group(1)}.{match.group(2)}")

DTYPES = ("float32", "bfloat16", "packed")  # packed: bfloat16 kept as uint16 bits (storage.py), the CPU arena's


@dataclasses.dataclass(frozen=True)
class KernelShape:
  """The attention shapes a kernel is compiled at. Only the head layout, block size and dtype change the kernel's
  code; batch, table width and pool size are constants of the launch."""

  name: str
  q_heads: int
  kv_heads: int
  head_dim: int
  block_size: int = 16
  batch: int = 4
  blocks: int = 64  # M: table width
  pages: int = 512  # P


SHAPES = {
    "smollm2": KernelShape("smollm2", q_heads=9, kv_heads=3, head_dim=64),  # the default model
    "llama3_8b": KernelShape("llama3_8b", q_heads=32, kv_heads=8, head_dim=128, blocks=1024, pages=8192),
    "phi3_mini": KernelShape("phi3_mini", q_heads=32, kv_heads=32, head_dim=96),  # head_dim padded to 128
}


@dataclasses.dataclass(frozen=True)
class Case:
  """One attention call to compile: kind, its config, the KV dtype and the shapes."""

  kind: str
  config: DenseConfig | TopKConfig | PSAConfig
  dtype: str
  shape: KernelShape

  def label(self) -> str:
    """The config's fields that differ from its defaults ("default" when none do)."""
    default = type(self.config)()
    changed = [f"{f.name}={getattr(self.config, f.name)}" for f in dataclasses.fields(self.config)
               if getattr(self.config, f.name) != getattr(default, f.name)]
    return " ".join(changed) or "default"

  def to_json(self) -> dict:
    return dict(kind=self.kind, config=dataclasses.asdict(self.config), dtype=self.dtype,
                shape=dataclasses.asdict(self.shape))

  @classmethod
  def from_json(cls, data: dict) -> "Case":
    return cls(data["kind"], KIND_CONFIGS[data["kind"]](**data["config"]), data["dtype"],
               KernelShape(**data["shape"]))


def default_cases(shapes: Sequence[str] = ("smollm2",), dtypes: Sequence[str] = ("float32", "bfloat16")
                  ) -> list[Case]:
  """Each attention kind at its default configuration."""
  return [Case(kind, config(), dtype, SHAPES[shape]) for shape in shapes for dtype in dtypes
          for kind, config in KIND_CONFIGS.items()]


def every_config() -> list[tuple[str, DenseConfig | TopKConfig | PSAConfig]]:
  """Every configuration that changes a kernel's code: dense; top-k with each score kind; PSA with each
  estimator, tail estimate, compensation and patience (1, or a streak). Other fields are runtime values."""
  configs = [("dense", DenseConfig())] + [("topk", TopKConfig(score=score)) for score in SCORE_KINDS]
  configs += [("psa", PSAConfig(estimator=e, tail=t, compensate=c, patience=p))
              for e in ESTIMATORS for t in TAILS for c in (False, True) for p in (1, 2)]
  return configs


def every_case(shapes: Sequence[str] = tuple(SHAPES), dtypes: Sequence[str] = DTYPES) -> list[Case]:
  return [Case(kind, config, dtype, SHAPES[shape]) for shape in shapes for dtype in dtypes
          for kind, config in every_config()]


@dataclasses.dataclass(frozen=True)
class CheckConfig:
  """How to run the check.

  archs: keys of ARCHS. compiler_dir: a folder holding the `jax-cuda12-plugin` / `jax-cuda12-pjrt` wheels of the
  running jaxlib's version (and `nvidia-cuda-nvcc-cu12` for ptxas), put on the workers' PYTHONPATH; None: what the
  running Python has (a GPU machine's jax brings its own). timeout_s: the longest one module may take to lower
  and compile before it counts as hung.
  """

  archs: tuple[str, ...] = ("sm_90", "sm_80")
  compiler_dir: str | None = None
  timeout_s: float = 120.0

  def __post_init__(self):
    if not self.archs:
      raise ValueError("archs must name at least one architecture")
    for name in self.archs:
      arch_named(name)


def repo_compiler_dir() -> str | None:
  """The repository's `.gpu-compile` folder (`make gpu-compiler`), if there is one."""
  path = pathlib.Path(__file__).resolve().parents[2] / ".gpu-compile"
  return str(path) if path.is_dir() else None


# ------------------------------------------------------------------------------------------------------ worker

@dataclasses.dataclass(frozen=True)
class TritonModule:
  """One Pallas kernel as lowered for CUDA: its name, Triton IR bytecode and launch parameters."""

  name: str
  bytecode: bytes
  num_warps: int
  num_stages: int


def _inputs(case: Case):
  """ShapeDtypeStructs of the call's arguments: q [B, Hq, D], k/v pages [H, P, S, D], table [B, M], lengths [B],
  summaries (each [H, P, D])."""
  import jax
  import jax.numpy as jnp
  from psa_jax.pallas_kernels.storage import PACKED
  from psa_jax.pallas_kernels.summaries import BlockSummaries

  s = case.shape
  pool = PACKED if case.dtype == "packed" else jnp.dtype(case.dtype)
  q_dtype = jnp.float32 if case.dtype == "float32" else jnp.bfloat16
  sds = jax.ShapeDtypeStruct
  pages = sds((s.kv_heads, s.pages, s.block_size, s.head_dim), pool)
  return (sds((s.batch, s.q_heads, s.head_dim), q_dtype), pages, pages, sds((s.batch, s.blocks), jnp.int32),
          sds((s.batch,), jnp.int32), BlockSummaries(*[sds((s.kv_heads, s.pages, s.head_dim), pool)] * 5))


def _call(case: Case) -> Callable:
  from psa_jax.attention import dense_attention, psa_attention, topk_attention

  if case.kind == "dense":
    return lambda q, k, v, t, n, summaries: dense_attention(q, k, v, t, n, case.config, impl="pallas",
                                                            interpret=False)
  fn = topk_attention if case.kind == "topk" else psa_attention
  return lambda *args: fn(*args, case.config, impl="pallas", interpret=False)


def lower(case: Case) -> list[TritonModule]:
  """The Triton modules of `case`'s call, in launch order. Raises whatever the lowering raises.

  jaxlib 0.10.2 leaves each module in its custom call. Newer jaxlibs compile each one inside the lowering (for
  sm_90 where no GPU is visible): the modules are taken from those calls, which go on to the real compiler, so
  the lowering completes as it would for XLA (in the worker, where a crash is contained).
  """
  import jax
  from jax._src.lib import triton

  captured = []

  def capture(platform, module, arch_name, *, num_warps, num_stages, **kwargs):
    captured.append((module, num_warps, num_stages))
    return real(platform, module, arch_name, num_warps=num_warps, num_stages=num_stages, **kwargs)

  real = triton.compile
  triton.compile = capture
  try:
    lowered = jax.jit(_call(case)).trace(*_inputs(case)).lower(lowering_platforms=("cuda",))
  finally:
    triton.compile = real
  if captured:
    return [TritonModule(_module_name(code), code, warps, stages) for code, warps, stages in captured]
  return _custom_call_modules(lowered.compiler_ir())


def _module_name(bytecode: bytes) -> str:
  from jax._src.interpreters import mlir
  from jax._src.lib.mlir import ir
  from jaxlib.triton import dialect

  ctx = mlir.make_ir_context()
  dialect.register_dialect(ctx)
  with ctx:
    module = ir.Module.parse(bytecode)
    for op in module.body.operations:
      if "sym_name" in op.attributes:
        return ir.StringAttr(op.attributes["sym_name"]).value
  return "kernel"


def _custom_call_modules(module) -> list[TritonModule]:
  """jaxlib 0.10.2 and older: the Triton module rides in each `__gpu$xla.gpu.triton` custom call's backend config."""
  from jax._src.lib.mlir import ir

  found = []

  def visit(op):
    if op.name == "stablehlo.custom_call":
      target = ir.StringAttr(op.attributes["call_target_name"]).value
      if target == "__gpu$xla.gpu.triton":
        config = ir.DictAttr(op.attributes["mhlo.backend_config"])
        found.append(TritonModule(ir.StringAttr(config["name"]).value, ir.StringAttr(config["ir"]).value_bytes,
                                  ir.IntegerAttr(config["num_warps"]).value,
                                  ir.IntegerAttr(config["num_stages"]).value))
    for region in op.regions:
      for block in region.blocks:
        for inner in block.operations:
          visit(inner.operation)

  visit(module.operation)
  return found


def ptxas_path(compiler_dir: str | None) -> str | None:
  """ptxas of an nvidia-cuda-nvcc-cu12 wheel: the compiler folder's (the pinned one), else one on sys.path (a GPU
  machine's jax[cuda] brings it), else ptxas on PATH."""
  for root in ([compiler_dir] if compiler_dir else []) + sys.path:
    candidate = pathlib.Path(root or ".") / "nvidia" / "cuda_nvcc" / "bin" / "ptxas"
    if candidate.is_file():
      return str(candidate)
  return shutil.which("ptxas")


def _ptxas(ptx: str, ptxas: str) -> dict:
  """Registers and spill bytes of the kernel in `ptx`, as ptxas reports them."""
  target = re.search(r"^\.target\s+(\S+)", ptx, re.M)
  with tempfile.TemporaryDirectory() as tmp:
    src = pathlib.Path(tmp) / "kernel.ptx"
    src.write_text(ptx)
    proc = subprocess.run([ptxas, f"-arch={target.group(1) if target else 'sm_90a'}", "-v", str(src),
                           "-o", str(pathlib.Path(tmp) / "kernel.cubin")], capture_output=True, text=True)
  if proc.returncode:
    return {"ptxas_error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
  regs = re.search(r"Used (\d+) registers", proc.stderr)
  spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr)
  return {"registers": int(regs.group(1)) if regs else None,
          "spill_bytes": int(spills.group(1)) + int(spills.group(2)) if spills else None}


def _compile(module: TritonModule, arch: Arch, ptxas: str | None) -> dict:
  from jax._src.lib import triton

  result = triton.compile("cuda", module.bytecode, arch.triton, num_warps=module.num_warps, num_ctas=1,
                          num_stages=module.num_stages)
  row = {"smem_bytes": int(result.smem_bytes), "ptx_bytes": len(result.asm)}
  if ptxas:
    row.update(_ptxas(result.asm, ptxas))
  return row


class _Stderr:
  """Collects what native code writes to fd 2 (MLIR's diagnostics) while the block runs."""

  def __init__(self, path: str):
    self.path = path

  def __enter__(self):
    sys.stderr.flush()
    self._saved = os.dup(2)
    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    os.close(fd)
    return self

  def __exit__(self, *exc):
    sys.stderr.flush()
    os.dup2(self._saved, 2)
    os.close(self._saved)


def _diagnostics(path: str) -> str:
  """The compiler's own error lines in a stderr capture (MLIR diagnostics, LLVM errors, a crash's top frames)."""
  try:
    text = pathlib.Path(path).read_text(errors="replace")
  except OSError:
    return ""
  keep = [line.strip() for line in text.splitlines()
          if re.search(r"error|LLVM ERROR|Assertion|Segmentation|#\d+ 0x", line, re.I)
          and "cuda drivers" not in line]
  return " | ".join(keep[:4])[:600]


def _worker(job_path: str) -> None:
  """Runs the jobs of `job_path` from its "start" entry on, one JSON line per event on stdout:
  {"begin": [case, module, arch index]} (module -1: the lowering) / {"lowered": case, "modules": names} /
  {"row": {...}}."""
  job = json.loads(pathlib.Path(job_path).read_text())
  import jax

  jax.devices()  # loads the plugins, which register the Triton compiler
  from jax._src.lib import triton

  has_compiler = triton.has_compilation_handler("cuda")
  ptxas = ptxas_path(job["compiler_dir"])
  capture = job_path + ".stderr"
  emit = lambda event: print(json.dumps(event), flush=True)
  compiled: dict[tuple, dict] = {}
  start = tuple(job["start"])  # (case, module, arch index): the first job this worker runs
  for ci in range(start[0], len(job["cases"])):
    case = Case.from_json(job["cases"][ci])
    emit({"begin": [ci, -1, -1]})
    try:
      with _Stderr(capture):
        modules = lower(case)
    except Exception as e:  # a kernel the lowering refuses: one failed row for the case
      emit({"row": dict(case=ci, module=-1, kernel="(lowering)", arch=None,
                        status=f"lowering failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")})
      continue
    emit({"lowered": ci, "modules": [m.name for m in modules]})
    for mi, module in enumerate(modules):
      for ai, arch_fields in enumerate(job["archs"]):
        if (ci, mi, ai) < start:
          continue
        arch = Arch(**arch_fields)
        arch_name = arch.name
        emit({"begin": [ci, mi, ai]})
        row = dict(case=ci, module=mi, kernel=module.name, arch=arch_name, num_warps=module.num_warps,
                   num_stages=module.num_stages, smem_limit=arch.smem_limit)
        key = (hashlib.sha256(module.bytecode).hexdigest(), arch_name, module.num_warps, module.num_stages)
        began = time.perf_counter()
        if not has_compiler:
          row["status"] = ("no Triton compiler for CUDA: install the jax-cuda12-plugin and jax-cuda12-pjrt wheels "
                           f"of jaxlib {jax.lib.__version__} (`make gpu-compiler`) and pass their folder")
        elif key in compiled:
          row.update(compiled[key])
        else:
          try:
            with _Stderr(capture):
              row.update(_compile(module, arch, ptxas))
            row["status"] = "ok" if row["smem_bytes"] <= arch.smem_limit else "over the shared memory limit"
          except Exception as e:
            detail = _diagnostics(capture)
            row["status"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" + (f" ({detail})" if detail else "")
          compiled[key] = {k: v for k, v in row.items() if k not in ("case", "module", "kernel", "arch")}
        row["seconds"] = time.perf_counter() - began
        emit({"row": row})


# ------------------------------------------------------------------------------------------------------ parent

def _worker_env(compiler_dir: str | None) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
  paths = [str(pathlib.Path(__file__).resolve().parents[2])]
  if compiler_dir:
    paths.insert(0, compiler_dir)
  env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  return env


def check(cases: Sequence[Case], config: CheckConfig = CheckConfig(),
          progress: Callable[[dict], None] | None = None) -> list[dict]:
  """Lowers and compiles every kernel of `cases` for each of `config.archs`, in worker processes.

  Returns one row per (case, kernel, arch): the case's kind, config label, dtype and shape; the kernel's name;
  status ("ok", the compiler's error, "crashed (signal N)", "timed out after T s", or the lowering's error);
  smem_bytes against smem_limit; registers and spill_bytes where ptxas is at hand. `progress` is called with
  each row as it comes.
  """
  rows: list[dict] = []

  def add(row):
    rows.append(_describe(cases, row))
    if progress:
      progress(rows[-1])

  with tempfile.TemporaryDirectory(prefix="psa_gpu_compile_") as tmp:
    job_path = os.path.join(tmp, "job.json")
    job = dict(cases=[c.to_json() for c in cases], archs=[dataclasses.asdict(arch_named(a)) for a in config.archs],
               compiler_dir=config.compiler_dir,
               start=[0, 0, 0])
    names: dict[int, list[str]] = {}  # case -> its kernels' names
    lowering_crashes: set[int] = set()
    while job["start"][0] < len(cases):
      pathlib.Path(job_path).write_text(json.dumps(job))
      proc = subprocess.Popen([sys.executable, "-m", "psa_jax.pallas_kernels.gpu_compile", job_path],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env=_worker_env(config.compiler_dir))
      current, failure = None, None
      deadline = time.monotonic() + config.timeout_s + 60  # the first job also waits for JAX to import
      while True:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
          proc.kill()
          failure = f"timed out after {config.timeout_s:g} s"
          break
        line = proc.stdout.readline()
        if not line:
          break
        try:
          event = json.loads(line)
        except json.JSONDecodeError:  # something a library printed
          continue
        if "begin" in event:
          current = event["begin"]
          deadline = time.monotonic() + config.timeout_s
        elif "lowered" in event:
          names[event["lowered"]] = event["modules"]
        elif "row" in event:
          add(event["row"])
      proc.wait()
      if failure is None and proc.returncode == 0:
        break
      if failure is None:
        failure = f"crashed (signal {-proc.returncode})" if proc.returncode < 0 else f"exited {proc.returncode}"
      if current is None:
        raise RuntimeError(f"the GPU compile worker {failure} before its first job")
      detail = _diagnostics(job_path + ".stderr")
      status = failure + (f" ({detail})" if detail else "")
      ci, mi, ai = current
      if mi < 0 and ci not in lowering_crashes:  # in the lowering, which never crashed yet: lower it again
        lowering_crashes.add(ci)
        job["start"] = [ci, 0, 0]
      elif mi < 0:  # the lowering crashed twice: the case is done
        add(dict(case=ci, module=-1, kernel="(lowering)", arch=None, status=status))
        job["start"] = [ci + 1, 0, 0]
      else:  # in one compile: the next worker goes on with the next (module, arch), the case lowered again
        add(dict(case=ci, module=mi, kernel=names[ci][mi], arch=config.archs[ai], status=status))
        job["start"] = [ci, mi, ai + 1]
  return rows


def _describe(cases: Sequence[Case], row: dict) -> dict:
  case = cases[row["case"]]
  return {"case_index": row["case"], "kind": case.kind, "config": case.label(), "dtype": case.dtype,
          "shape": case.shape.name, **{k: v for k, v in row.items() if k != "case"}}


def failures(rows: Iterable[dict]) -> list[dict]:
  return [r for r in rows if r["status"] != "ok"]


def case_status(cases: Sequence[Case], rows: Sequence[dict]) -> list[str | None]:
  """Per case: None if every kernel compiled for every arch, else the first failure's arch, kernel and status."""
  out: list[str | None] = [None] * len(cases)
  for r in rows:
    if r["status"] != "ok" and out[r["case_index"]] is None:
      out[r["case_index"]] = f"{r['kernel']} for {r['arch'] or 'every arch'}: {r['status']}"
  return out


if __name__ == "__main__":
  _worker(sys.argv[1])
