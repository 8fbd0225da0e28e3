"""The GPU compile check, on any machine: every Pallas kernel in every configuration, lowered for CUDA and compiled
to PTX for each architecture (psa_jax/pallas_kernels/gpu_compile.py says how, and what it proves).

    make gpu-compile                                    # everything: every config, dtype and shape, sm_90 and sm_80
    make gpu-compile ARGS="--cases=default --shapes=smollm2"

Prints a row per compile as it finishes, then a summary per (kernel, dtype, shape, arch) over the configurations
that share it, and writes every row to `--out_dir`/gpu_compile.json. Exits 1 if anything failed to compile.
"""

from __future__ import annotations

import collections
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runs from the working tree, installed or not
  sys.path.insert(0, str(REPO))

from absl import app, flags  # noqa: E402

from psa_jax.pallas_kernels import gpu_compile  # noqa: E402

_CASES = flags.DEFINE_enum("cases", "all", ["all", "default"],
                           "all: every configuration that changes a kernel's code; default: each kind's defaults.")
_SHAPES = flags.DEFINE_list("shapes", list(gpu_compile.SHAPES), f"Of {list(gpu_compile.SHAPES)}.")
_DTYPES = flags.DEFINE_list("dtypes", list(gpu_compile.DTYPES), f"KV dtypes, of {list(gpu_compile.DTYPES)}.")
_ARCHS = flags.DEFINE_list("archs", list(gpu_compile.CheckConfig.archs), f"Of {list(gpu_compile.ARCHS)}, or sm_NN.")
_COMPILER_DIR = flags.DEFINE_string("compiler_dir", None, "Folder of the jax-cuda12-plugin/-pjrt (and "
                                    "nvidia-cuda-nvcc-cu12) wheels (default: the repository's .gpu-compile, "
                                    "from `make gpu-compiler`; none: the running Python's own, as on a GPU machine).")
_TIMEOUT = flags.DEFINE_float("timeout_s", 120.0, "Seconds one module may take before it counts as hung.")
_OUT_DIR = flags.DEFINE_string("out_dir", str(REPO / "benchmarks" / "gpu_compile"), "Where gpu_compile.json goes.")


def summarize(rows: list[dict]) -> list[dict]:
  """One line per (kernel, dtype, shape, arch): how many configurations share it, how many compiled, and the
  largest shared memory, register count and spill over them."""
  groups = collections.defaultdict(list)
  for r in rows:
    groups[(r["kernel"], r["dtype"], r["shape"], r["arch"])].append(r)
  out = []
  for (kernel, dtype, shape, arch), rs in groups.items():
    best = lambda key: max((r[key] for r in rs if r.get(key) is not None), default=None)
    out.append(dict(kernel=kernel, dtype=dtype, shape=shape, arch=arch, configs=len(rs),
                    compiled=sum(r["status"] == "ok" for r in rs), smem_kib=(best("smem_bytes") or 0) / 1024,
                    smem_limit_kib=(rs[0].get("smem_limit") or 0) / 1024, registers=best("registers"),
                    spill_bytes=best("spill_bytes")))
  return out


def main(argv):
  del argv
  from psa_jax.bench import common

  if _CASES.value == "all":
    cases = gpu_compile.every_case(_SHAPES.value, _DTYPES.value)
  else:
    cases = gpu_compile.default_cases(_SHAPES.value, _DTYPES.value)
  compiler_dir = _COMPILER_DIR.value or gpu_compile.repo_compiler_dir()
  if compiler_dir == "none":
    compiler_dir = None
  config = gpu_compile.CheckConfig(archs=tuple(_ARCHS.value), compiler_dir=compiler_dir, timeout_s=_TIMEOUT.value)
  print(f"gpu_compile: {len(cases)} cases x {len(config.archs)} archs, compiler {compiler_dir or 'of this Python'}",
        file=sys.stderr, flush=True)
  began = time.perf_counter()
  count = [0]

  def show(row):
    count[0] += 1
    extra = "" if row["status"] == "ok" else f"  {row['status']}"
    print(f"[{count[0]}] {row['kind']} {row['config']} {row['dtype']} {row['shape']} {row['kernel']} "
          f"{row['arch']}: smem {row.get('smem_bytes')} regs {row.get('registers')} "
          f"spills {row.get('spill_bytes')}{extra}", file=sys.stderr, flush=True)

  rows = gpu_compile.check(cases, config, progress=show)
  seconds = time.perf_counter() - began
  failed = gpu_compile.failures(rows)
  summary = summarize(rows)
  print("\n" + common.table(summary, ["kernel", "dtype", "shape", "arch", "configs", "compiled", "smem_kib",
                                       "smem_limit_kib", "registers", "spill_bytes"]))
  if failed:
    print("\nfailed:\n" + common.table(failed, ["kind", "config", "dtype", "shape", "kernel", "arch", "status"]))
  out_dir = pathlib.Path(_OUT_DIR.value)
  out_dir.mkdir(parents=True, exist_ok=True)
  import jax
  (out_dir / "gpu_compile.json").write_text(json.dumps(
      {"command": " ".join(sys.argv), "machine": common.machine(), "jax": jax.__version__, "seconds": seconds,
       "cases": len(cases), "compiles": len(rows), "failed": len(failed), "summary": summary, "rows": rows},
      indent=1))
  print(f"\n{len(rows) - len(failed)}/{len(rows)} compiled ({len(cases)} cases) in {seconds:.0f} s; "
        f"wrote {out_dir / 'gpu_compile.json'}")
  return 1 if failed else 0


if __name__ == "__main__":
  app.run(main)
