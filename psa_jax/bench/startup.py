"""Start-up of the real server: how long `python -m psa_jax.serve` takes to answer /health and its first request,
cold (an empty compilation cache: everything compiles) and warm (a restart on the same machine: the persistent
cache answers), with and without the warm-up.

  cold  a fresh cache directory; the warm-up compiles the common shapes before the server listens
  warm  the same directory again: the warm-up loads them
A row reports seconds to ready, the first request's latency (a 64-token prompt, 16 greedy tokens) and the
XLA compilations the server ran by then (its /metrics `psa:compilations_total`).
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import tempfile
import time

import httpx

from psa_jax.bench import common
from psa_jax.bench.server_process import running_server


@dataclasses.dataclass(frozen=True)
class StartupConfig:
  model: str | None = None
  server_flags: tuple[str, ...] = ()
  warmups: tuple[bool, ...] = (True, False)  # the server's --warmup
  prompt_tokens: int = 64
  output_tokens: int = 16


def _compilations(url: str) -> float:
  for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
    if line.startswith("psa:compilations_total "):
      return float(line.split()[-1])
  return float("nan")


def _start(config: StartupConfig, cache: str, warmup: bool, log: pathlib.Path) -> dict:
  flags = [f"--compilation_cache_dir={cache}", "--warmup" if warmup else "--nowarmup", *config.server_flags]
  if config.model:
    flags.append(f"--model={config.model}")
  began = time.perf_counter()
  with running_server(*flags, timeout=1800, log_path=log) as server:
    ready = time.perf_counter() - began
    body = {"prompt": list(range(1000, 1000 + config.prompt_tokens)), "max_tokens": config.output_tokens,
            "temperature": 0, "ignore_eos": True}
    sent = time.perf_counter()
    response = httpx.post(server.url + "/v1/completions", json=body, timeout=1800)
    first = time.perf_counter() - sent
    response.raise_for_status()
    return {"ready_s": ready, "first_request_s": first, "compilations": _compilations(server.url)}


def run(config: StartupConfig, out_dir: pathlib.Path) -> list[dict]:
  out_dir.mkdir(parents=True, exist_ok=True)
  rows = []
  for warmup in config.warmups:
    cache = tempfile.mkdtemp(prefix="psa_xla_cache_")
    try:
      for start in ("cold", "warm"):
        common.progress(f"{start} start, warmup={warmup}")
        row = {"start": start, "warmup": warmup,
               **_start(config, cache, warmup, out_dir / f"startup_{start}_{'warmup' if warmup else 'nowarmup'}.log")}
        common.progress(f"  ready in {row['ready_s']:.1f} s, first request {row['first_request_s']:.2f} s, "
                        f"{row['compilations']:.0f} compilations")
        rows.append(row)
    finally:
      shutil.rmtree(cache, ignore_errors=True)
  print(common.table(rows, ["start", "warmup", "ready_s", "first_request_s", "compilations"]))
  common.save(out_dir, "startup", rows, {"config": dataclasses.asdict(config)})
  return rows
