"""Serving under load, like `vllm bench serve`: one real `python -m psa_jax.serve` process per (attention,
scheduler) pair, driven over HTTP with streamed /v1/completions requests at fixed concurrencies and Poisson rates.

Per request (reported in ms):
  TTFT  from sending the request to the first SSE chunk with non-empty text (queueing plus the prompt's prefill).
  ITL   the gaps between successive chunks with text. The engine hands out a whole decode window's tokens at once
        (up to the server's --decode_window, cut short at --max_window_seconds), so one chunk may carry several
        tokens: an ITL is the time between windows, not between tokens.
  TPOT  (E2EL - TTFT) / (output tokens - 1): the time per token after the first, with the output token count taken
        from the final usage chunk; requests with a single output token have none.
  E2EL  from sending the request to the end of its stream ([DONE]).
Per level: completed and failed requests, the level's duration (first request sent to last response ended), request
throughput, output token throughput and total (prompt + output) token throughput over that duration, and the mean,
p50 and p99 of each per-request figure.

Levels. `concurrency N` is a closed loop: N workers, each sending its next request as soon as its previous one ends,
num_prompts requests in all. `rate R` sends num_prompts requests with exponentially distributed gaps of mean 1/R s
(Poisson arrivals), however many are already in flight.

Workload. Every prompt is exactly prompt_tokens token ids of English prose (`common.prose` through the model's own
tokenizer, read without loading the weights), cut from a different place in the text; every server gets the same
prompts in the same order, and every rate level the same arrival times. Requests ask for output_tokens tokens with
`ignore_eos` so that each generates exactly that many (a server that ignores the field may stop early at an
end-of-sequence token; the progress line counts such requests).

Warm-up. A server compiles its common shapes itself before it reports ready (its --warmup, on by default, and
its persistent compilation cache; the first start on a machine takes minutes). On top of that, before its first
level each server gets two unmeasured bursts of warmup_requests concurrent requests, so
XLA compiles the batch and context shapes before the clock runs: first long requests that are held open until all
of them are decoding together and then dropped (the server cancels them), so every batch size up to the burst's
gets compiled even when a measured request is shorter than one decode window and would never overlap another in a
single burst; then requests of the measured sizes, which must all complete or the study stops there. A shape first
met later (a larger batch under a Poisson burst) still compiles inside a measured request and shows up in the p99
figures; the server's own count of XLA compilations (its /metrics `psa:compilations_total`, when it has one) is
read before and after every level, and a level's `compilations` says how many ran inside it.

The client runs on the server's machine: on a small CPU it takes a little of the server's compute.
Failures (HTTP errors, broken streams, a server that dies) are counted per level and listed in the JSON; after a
server dies its remaining levels are recorded as failed, and the study raises ServerDied, with the tail of the
server's log, once the results are written. Each server's log is kept as server_<attention>_<scheduler>.log in
out_dir.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import pathlib
import time

import httpx
import numpy as np

from psa_jax.bench import common
from psa_jax.bench.server_process import ServerDied, running_server
from psa_jax.models import checkpoint

DEFAULT_SCHEDULER = "default"  # the scheduler column when no --scheduler flag is passed


@dataclasses.dataclass(frozen=True)
class ServingConfig:
  model: str | None = None  # the servers' --model; None: the server's default model
  attentions: tuple[str, ...] = ("dense", "topk", "psa")
  schedulers: tuple[str, ...] = ("budget",)  # each passed as --scheduler=<value>; (): no --scheduler flag at all
  concurrencies: tuple[int, ...] = (1, 4, 8, 16)  # closed-loop levels (requests in flight)
  request_rates: tuple[float, ...] = ()  # Poisson levels (requests / s), unbounded concurrency
  num_prompts: int = 32  # requests per level
  prompt_tokens: int = 512
  output_tokens: int = 64
  server_flags: tuple[str, ...] = ()  # passed to every server, e.g. ("--max_context=2048",)
  seed: int = 0  # prompts and arrival times
  prompt_source: str = "prose"  # or "random": ids drawn uniformly from [100, min(vocab, 20000))
  warmup_requests: int | None = None  # None: the largest concurrency, at least 8 when there are rate levels
  request_timeout_s: float = 600.0  # longest wait for any byte of a response before it counts as failed
  server_timeout_s: float = 900.0  # longest wait for a new server to answer /health (its warm-up included)

  def __post_init__(self):
    if not self.concurrencies and not self.request_rates:
      raise ValueError("give at least one concurrency or request rate")
    if any(c < 1 for c in self.concurrencies) or any(r <= 0 for r in self.request_rates):
      raise ValueError("concurrencies must be >= 1 and request rates > 0")
    if min(self.num_prompts, self.prompt_tokens, self.output_tokens) < 1:
      raise ValueError("num_prompts, prompt_tokens and output_tokens must be >= 1")
    if self.prompt_source not in ("prose", "random"):
      raise ValueError(f"prompt_source must be 'prose' or 'random', got {self.prompt_source!r}")

  @property
  def warmup(self) -> int:
    if self.warmup_requests is not None:
      return self.warmup_requests
    return max((*self.concurrencies, 8 if self.request_rates else 1))

  @property
  def levels(self) -> list[tuple[str, float]]:
    """("concurrency", N) and ("rate", R) in the order they run."""
    return [("concurrency", c) for c in self.concurrencies] + [("rate", r) for r in self.request_rates]


# ------------------------------------------------------------------------------------------------ workload


def read_tokenizer(model: str | None):
  """The model's tokenizer alone (its weights are left on disk)."""
  path = checkpoint.resolve(model)
  _, tokenizer, _ = checkpoint.read_hf_directory(path) if path.is_dir() else checkpoint.read_gguf(path)
  return tokenizer


def make_prompts(config: ServingConfig, count: int) -> list[list[int]]:
  """`count` prompts of exactly config.prompt_tokens token ids each, all different."""
  tokenizer = read_tokenizer(config.model)
  rng = np.random.default_rng(config.seed)
  if config.prompt_source == "random":
    high = min(tokenizer.vocab_size, 20000)
    return rng.integers(100, high, size=(count, config.prompt_tokens)).tolist()
  # ~4 characters a token: enough text that the windows start at distinct places of the (unrepeated) prose.
  ids = tokenizer.encode(common.prose(400_000 + 6 * config.prompt_tokens))
  room = len(ids) - config.prompt_tokens
  starts = rng.choice(room, size=count, replace=count > room)
  return [ids[s:s + config.prompt_tokens] for s in starts]


# ------------------------------------------------------------------------------------------------ requests


@dataclasses.dataclass
class Outcome:
  """One request. error is None when it completed; times are in seconds from sending it."""
  error: str | None = None
  ttft: float = 0.0
  e2el: float = 0.0
  itl: list[float] = dataclasses.field(default_factory=list)  # gaps between chunks with text
  prompt_tokens: int = 0
  output_tokens: int = 0


async def send(client: httpx.AsyncClient, prompt: list[int], output_tokens: int) -> Outcome:
  """Streams one completion of `prompt` (token ids) and times it."""
  body = {"prompt": prompt, "max_tokens": output_tokens, "ignore_eos": True, "temperature": 0, "stream": True,
          "stream_options": {"include_usage": True}}
  start = time.perf_counter()
  ttft = last = usage = None
  itl, done = [], False
  try:
    async with client.stream("POST", "/v1/completions", json=body) as response:
      if response.status_code != 200:
        detail = (await response.aread()).decode(errors="replace")
        return Outcome(f"HTTP {response.status_code}: {detail[:300]}")
      async for line in response.aiter_lines():
        if not line.startswith("data:"):
          continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
          done = True
          break
        now = time.perf_counter()
        chunk = json.loads(data)
        if "error" in chunk:
          return Outcome(f"error in the stream: {chunk['error']}")
        usage = chunk.get("usage") or usage
        choices = chunk.get("choices") or []
        if choices and choices[0].get("text"):
          if ttft is None:
            ttft = now - start
          else:
            itl.append(now - last)
          last = now
  except (httpx.HTTPError, json.JSONDecodeError) as e:
    return Outcome(f"{type(e).__name__}: {e}")
  e2el = time.perf_counter() - start
  if not done:
    return Outcome("the stream ended without [DONE]")
  if ttft is None:
    return Outcome("no text was generated")
  if not usage:
    return Outcome("no usage chunk at the end of the stream")
  return Outcome(None, ttft, e2el, itl, usage["prompt_tokens"], usage["completion_tokens"])


async def _ramp(client: httpx.AsyncClient, prompts: list[list[int]], max_tokens: int) -> list[str]:
  """Streams one long completion per prompt at once and hangs up on all of them once each has had two chunks of
  text (so the server has decoded all of them in one batch) or has ended. Returns the errors."""
  errors = []
  ready = [asyncio.Event() for _ in prompts]

  async def hold(prompt, event):
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True}
    texts = 0
    try:
      async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
          errors.append(f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:300]}")
          return
        async for line in response.aiter_lines():
          if line.startswith("data: {") and ((json.loads(line[6:]).get("choices") or [{}])[0].get("text")):
            texts += 1
            if texts == 2:
              event.set()
    except (httpx.HTTPError, json.JSONDecodeError) as e:
      errors.append(f"{type(e).__name__}: {e}")
    finally:
      event.set()

  tasks = [asyncio.create_task(hold(p, e)) for p, e in zip(prompts, ready)]
  await asyncio.gather(*(e.wait() for e in ready))
  for task in tasks:
    task.cancel()  # closes the connection; the server notices and cancels the request
  await asyncio.gather(*tasks, return_exceptions=True)
  return errors


async def _closed_loop(client, prompts, concurrency: int, output_tokens: int) -> list[Outcome]:
  pending = iter(prompts)  # shared by the workers; next() never awaits, so no two workers take the same prompt
  outcomes = []

  async def worker():
    for prompt in pending:
      outcomes.append(await send(client, prompt, output_tokens))

  await asyncio.gather(*(worker() for _ in range(concurrency)))
  return outcomes


async def _poisson(client, prompts, rate: float, output_tokens: int, seed: int) -> list[Outcome]:
  gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=len(prompts))
  arrivals = np.concatenate([[0.0], np.cumsum(gaps[:-1])])  # the first request goes at once
  loop = asyncio.get_running_loop()
  start = loop.time()
  tasks = []
  for prompt, at in zip(prompts, arrivals):
    # Absolute send times: a late wake-up does not push every later arrival back.
    await asyncio.sleep(max(0.0, start + at - loop.time()))
    tasks.append(asyncio.create_task(send(client, prompt, output_tokens)))
  return list(await asyncio.gather(*tasks))


def run_level(url: str, prompts: list[list[int]], kind: str, value: float, output_tokens: int, *, timeout: float,
              seed: int = 0) -> tuple[list[Outcome], float]:
  """Sends `prompts` at one level ("concurrency", N) or ("rate", R); returns the outcomes and the duration (s).
  kind "ramp" holds len(prompts) requests of up to `output_tokens` open together, then drops them (see _ramp);
  it returns the errors instead of outcomes."""

  async def main():
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)  # rate levels are unbounded
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
      start = time.perf_counter()
      if kind == "ramp":
        outcomes = await _ramp(client, prompts, output_tokens)
      elif kind == "concurrency":
        outcomes = await _closed_loop(client, prompts, int(value), output_tokens)
      else:
        outcomes = await _poisson(client, prompts, value, output_tokens, seed)
      return outcomes, time.perf_counter() - start

  return asyncio.run(main())


# ------------------------------------------------------------------------------------------------ summaries


def summarize(outcomes: list[Outcome], duration: float, output_tokens: int) -> dict:
  """One level's row: counts, throughputs (per s) and mean / p50 / p99 of TTFT, TPOT, ITL and E2EL (ms)."""
  ok = [o for o in outcomes if o.error is None]
  total_in = sum(o.prompt_tokens for o in ok)
  total_out = sum(o.output_tokens for o in ok)
  per_s = lambda n: n / duration if duration > 0 else 0.0  # a level that never ran has no duration
  row = {"completed": len(ok), "failed": len(outcomes) - len(ok), "duration_s": duration,
         "request_throughput": per_s(len(ok)), "output_throughput": per_s(total_out),
         "total_token_throughput": per_s(total_in + total_out), "total_input_tokens": total_in,
         "total_output_tokens": total_out, "short_outputs": sum(o.output_tokens < output_tokens for o in ok)}
  figures = {"ttft": [o.ttft for o in ok],
             "tpot": [(o.e2el - o.ttft) / (o.output_tokens - 1) for o in ok if o.output_tokens > 1],
             "itl": [gap for o in ok for gap in o.itl],
             "e2el": [o.e2el for o in ok]}
  for name, seconds in figures.items():
    ms = 1e3 * np.asarray(seconds)
    row[f"mean_{name}_ms"] = float(ms.mean()) if len(ms) else None
    row[f"p50_{name}_ms"] = float(np.percentile(ms, 50)) if len(ms) else None
    row[f"p99_{name}_ms"] = float(np.percentile(ms, 99)) if len(ms) else None
  row["errors"] = dict(collections.Counter(o.error for o in outcomes if o.error is not None).most_common(5))
  return row


def compilations(url: str) -> int | None:
  """The server's count of XLA compilations so far (/metrics), or None if it does not report one."""
  try:
    text = httpx.get(url + "/metrics", timeout=30).text
  except httpx.HTTPError:
    return None
  for line in text.splitlines():
    if line.startswith("psa:compilations_total "):
      return int(float(line.split()[1]))
  return None


def _level_name(kind: str, value: float) -> str:
  return f"concurrency {value}" if kind == "concurrency" else f"rate {value:g}/s"


def _progress_line(name: str, row: dict, requested: int) -> str:
  ms = lambda x: "-" if x is None else f"{x:.0f} ms"
  line = (f"{name}: {row['completed']}/{requested} completed, {row['request_throughput']:.2f} req/s, "
          f"{row['output_throughput']:.1f} output tok/s, TTFT p50 {ms(row['p50_ttft_ms'])}, "
          f"TPOT p50 {ms(row['p50_tpot_ms'])}, E2EL p50 {ms(row['p50_e2el_ms'])} ({row['duration_s']:.1f} s)")
  if row["compilations"]:
    line += f"; {row['compilations']} XLA compilations ran inside this level (its latencies include them)"
  if row["short_outputs"]:
    line += f"; {row['short_outputs']} stopped before output_tokens (ignore_eos not honoured?)"
  if row["errors"]:
    line += "; failures: " + "; ".join(f"{n}x {e}" for e, n in row["errors"].items())
  return line


# ------------------------------------------------------------------------------------------------ the study


def _serve_one(config: ServingConfig, attention: str, scheduler: str | None, prompts: list[list[int]],
               out_dir: pathlib.Path) -> tuple[list[dict], str | None]:
  """Every level against one server; returns its rows and, if the server died, the error with its log tail."""
  label = scheduler or DEFAULT_SCHEDULER
  flags = [f"--attention={attention}", *([f"--scheduler={scheduler}"] if scheduler else []),
           *([f"--model={config.model}"] if config.model else []), *config.server_flags]
  common.progress(f"starting a server: {' '.join(flags)}")
  rows, death = [], None
  with running_server(*flags, timeout=config.server_timeout_s,
                      log_path=out_dir / f"server_{attention}_{label}.log") as server:
    warmup, measured = prompts[:config.warmup], prompts[config.warmup:]
    common.progress(f"{attention}/{label}: warm-up, 2 x {len(warmup)} concurrent requests (compiles; not measured)")
    context = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0].get("max_model_len")
    long_output = max(config.output_tokens, (context or 0) - config.prompt_tokens)
    ramp_errors, duration = run_level(server.url, warmup, "ramp", len(warmup), long_output,
                                      timeout=config.request_timeout_s)
    if ramp_errors:
      common.progress(f"{attention}/{label}: the warm-up's long requests failed ({ramp_errors[0]}); going on")
    outcomes, more = run_level(server.url, warmup, "concurrency", len(warmup), config.output_tokens,
                               timeout=config.request_timeout_s)
    duration += more
    errors = [o.error for o in outcomes if o.error is not None]
    if errors:
      server.check_alive()
      raise RuntimeError(f"{attention}/{label}: {len(errors)} of {len(warmup)} warm-up requests failed, e.g. "
                         f"{errors[0]}\nlast lines of the server's log:\n{server.log_tail()}")
    common.progress(f"{attention}/{label}: warm-up done in {duration:.1f} s")
    for i, (kind, value) in enumerate(config.levels):
      level_prompts = measured[i * config.num_prompts:(i + 1) * config.num_prompts]
      name = f"{attention}/{label} {_level_name(kind, value)}"
      compiled = None
      if death is None:
        before = compilations(server.url)
        outcomes, duration = run_level(server.url, level_prompts, kind, value, config.output_tokens,
                                       timeout=config.request_timeout_s, seed=config.seed + i)
        try:
          server.check_alive()
          after = compilations(server.url)
          compiled = None if before is None or after is None else after - before
        except ServerDied as e:
          death = f"{attention}/{label} during {_level_name(kind, value)}: {e}"
      else:
        outcomes, duration = [Outcome("the server had died before this level")] * len(level_prompts), 0.0
      row = {"attention": attention, "scheduler": label, "level": _level_name(kind, value),
             "concurrency": int(value) if kind == "concurrency" else None,
             "request_rate": float(value) if kind == "rate" else None,
             **summarize(outcomes, duration, config.output_tokens), "compilations": compiled}
      rows.append(row)
      common.progress(_progress_line(name, row, len(level_prompts)))
  return rows, death


COLUMNS = ["attention", "scheduler", "level", "completed", "failed", "request_throughput", "output_throughput",
           "p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p99_tpot_ms", "p50_itl_ms", "p50_e2el_ms", "compilations"]


def run(config: ServingConfig, out_dir) -> list[dict]:
  """Runs every (attention, scheduler) pair at every level; prints the table and writes serving.json, serving.png
  and the servers' logs to out_dir. Returns the rows (one per pair and level)."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  prompts = make_prompts(config, config.warmup + len(config.levels) * config.num_prompts)
  rows, deaths = [], []
  try:
    for attention in config.attentions:
      for scheduler in config.schedulers or (None,):
        pair_rows, death = _serve_one(config, attention, scheduler, prompts, out_dir)
        rows += pair_rows
        if death:
          common.progress(death)
          deaths.append(death)
  finally:
    # Whatever ran is written, also when a server fails to start or a warm-up fails.
    if rows:
      print("\n" + common.table(rows, COLUMNS), flush=True)
      common.save(out_dir, "serving", rows, {"config": dataclasses.asdict(config), "server_deaths": deaths})
      plot(rows, out_dir / "serving.png")
  if deaths:
    raise ServerDied("\n\n".join(deaths))
  return rows


def plot(rows: list[dict], path: pathlib.Path) -> pathlib.Path | None:
  """TTFT p50 and output tokens/s against concurrency (and against request rate when there are rate levels), one
  line per attention and scheduler. None when no level completed a request (nothing to draw)."""
  pairs = list(dict.fromkeys((r["attention"], r["scheduler"]) for r in rows))
  panels = []
  for x_key, xlabel, logx in (("concurrency", "concurrency (requests in flight)", True),
                              ("request_rate", "request rate (requests / s, Poisson)", False)):
    for y_key, title, ylabel in (("p50_ttft_ms", "Time to first token, p50", "ms"),
                                 ("output_throughput", "Output throughput", "tokens / s")):
      series = {}
      for attention, scheduler in pairs:
        points = [(r[x_key], r[y_key]) for r in rows if r["attention"] == attention and r["scheduler"] == scheduler
                  and r[x_key] is not None and r[y_key] is not None]
        if points:
          series[f"{attention}, {scheduler}"] = ([x for x, _ in points], [y for _, y in points])
      if series:
        panels.append({"title": title, "xlabel": xlabel, "ylabel": ylabel, "series": series, "logx": logx})
  if not panels:
    return None
  return common.plot_panels(path, "Serving under load (psa_jax.serve over HTTP)", panels)
