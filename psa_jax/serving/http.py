"""The OpenAI-compatible HTTP front (FastAPI on uvicorn) over an `Engine` running on its own thread.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with "stream": true as server-sent events),
GET /v1/models, GET /health, GET /metrics (Prometheus text).

Beyond OpenAI's fields, a request body may carry "psa": {"attention": "dense"|"topk"|"psa", "tau": 0.9} to pick
the attention and PSA's threshold for that request alone.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import prometheus_client as prom
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from psa_jax.serving.config import SamplingParams
from psa_jax.serving.engine import Engine

MAX_STOP_STRINGS = 8


class BadRequest(Exception):
  def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"):
    super().__init__(message)
    self.message, self.param, self.status, self.kind = message, param, status, kind


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
  return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


class Metrics:
  """Prometheus metrics under vLLM's names and meanings, prefixed `psa:` (dashboards built for vLLM read them
  with the prefix changed), plus PSA's own: how much of the KV each layer's attention reads."""

  def __init__(self, engine: Engine):
    from psa_jax.serving.compilation import compile_counter

    self.registry = prom.CollectorRegistry()
    r = self.registry
    latency = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
    per_token = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
    self.success = prom.Counter("psa:request_success", "Finished requests by finish reason", ["finished_reason"],
                                registry=r)
    self.ttft = prom.Histogram("psa:time_to_first_token_seconds", "Time to first token", buckets=latency,
                               registry=r)
    self.itl = prom.Histogram("psa:inter_token_latency_seconds", "Time between successive output tokens",
                              buckets=per_token, registry=r)
    self.tpot = prom.Histogram("psa:request_time_per_output_token_seconds",
                               "A request's decode time per output token after the first", buckets=per_token,
                               registry=r)
    self.e2e = prom.Histogram("psa:e2e_request_latency_seconds", "Arrival to last token", buckets=latency,
                              registry=r)
    self.queue = prom.Histogram("psa:request_queue_time_seconds", "Arrival to admission", buckets=latency,
                                registry=r)
    self.prefill_time = prom.Histogram("psa:request_prefill_time_seconds", "Admission to first token",
                                       buckets=latency, registry=r)
    r.register(_EngineCollector(engine, compile_counter()))

  def finished(self, request) -> None:
    self.success.labels(request.finish_reason or "unknown").inc()
    if request.first_token_at is None:
      return
    self.ttft.observe(request.first_token_at - request.arrival)
    if request.admitted_at is not None:
      self.queue.observe(request.admitted_at - request.arrival)
      self.prefill_time.observe(max(0.0, request.first_token_at - request.admitted_at))
    if request.finished_at is not None:
      self.e2e.observe(request.finished_at - request.arrival)
      if len(request.output) > 1:
        per_token = (request.finished_at - request.first_token_at) / (len(request.output) - 1)
        self.tpot.observe(per_token)
        for _ in range(len(request.output) - 1):  # tokens of a window arrive together: each gets the mean gap
          self.itl.observe(per_token)


class _EngineCollector:
  """Values read from the engine at scrape time."""

  def __init__(self, engine: Engine, counter):
    self.engine, self.counter = engine, counter

  def collect(self):
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    e = self.engine
    stats = e.stats()
    yield GaugeMetricFamily("psa:num_requests_running", "Requests prefilling or decoding", stats["running"])
    yield GaugeMetricFamily("psa:num_requests_waiting", "Requests waiting for a slot or pages", stats["waiting"])
    yield GaugeMetricFamily("psa:kv_cache_usage_perc", "Share of KV arena pages in use (1 = full)",
                            stats["pages_used"] / max(stats["pages_total"], 1))
    yield CounterMetricFamily("psa:num_preemptions", "Requests preempted for pages", stats["preempted"])
    yield CounterMetricFamily("psa:prompt_tokens", "Prompt tokens admitted", stats["prompt_tokens"])
    yield CounterMetricFamily("psa:generation_tokens", "Tokens generated", stats["generated_tokens"])
    yield CounterMetricFamily("psa:compilations", "XLA compilations run by this process (persistent-cache hits "
                              "excluded)", self.counter.compiles)
    share = GaugeMetricFamily("psa:kv_read_share", "Share of the KV blocks the last decode window of each "
                              "attention kind read (1 = dense)", labels=["attention"])
    blocks = GaugeMetricFamily("psa:kv_blocks_read", "KV blocks read per KV head and step in the last decode "
                               "window of each attention kind, by layer", labels=["attention", "layer"])
    for kind, window in sorted(dict(e.last_window).items()):
      share.add_metric([kind], window["blocks_share"])
      for layer, value in enumerate(window["blocks_mean_per_layer"]):
        blocks.add_metric([kind, str(layer)], value)
    yield share
    yield blocks


def _field(body: dict, name: str, kinds, default, *, check=None, message=""):
  value = body.get(name, default)
  if value is None:
    return default
  if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
    raise BadRequest(f"'{name}' must be {message or kinds}", name)
  if not isinstance(value, kinds):
    raise BadRequest(f"'{name}' must be {message or getattr(kinds, '__name__', kinds)}, got {type(value).__name__}", name)
  if check is not None and not check(value):
    raise BadRequest(f"'{name}' {message}, got {value!r}", name)
  return value


class TextStream:
  """Incremental detokenization with stop strings: feed token ids, get the new text that is safe to send."""

  def __init__(self, tokenizer, stops: list[str]):
    self.tokenizer, self.stops = tokenizer, stops
    self.ids: list[int] = []
    self.sent = 0
    self.stopped = False

  def feed(self, ids: list[int], final: bool) -> str:
    self.ids.extend(ids)
    text = self.tokenizer.decode(self.ids)
    for stop in self.stops:
      at = text.find(stop)
      if at >= 0:
        text, final, self.stopped = text[:at], True, True
    if not final:
      # Hold back an unfinished UTF-8 sequence and any tail that could still grow into a stop string.
      text = text.rstrip("\ufffd")
      hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
      text = text[: len(text) - hold]
    new, self.sent = text[self.sent :], max(self.sent, len(text))
    return new

  @property
  def text(self) -> str:
    return self.tokenizer.decode(self.ids)


def create_app(engine: Engine, model_name: str, *, drain_timeout: float = 10.0) -> FastAPI:
  metrics = Metrics(engine)
  tokenizer = engine.tokenizer
  context = engine.config.max_context

  async def lifespan(app):
    engine.start()
    yield
    engine.stop(drain_timeout=drain_timeout)  # SIGTERM: finish what is in flight, cancel the rest

  app = FastAPI(title="psa_jax", lifespan=lifespan)

  @app.exception_handler(BadRequest)
  async def bad_request(_, exc: BadRequest):
    return _error(exc.status, exc.message, exc.param, exc.kind)

  @app.exception_handler(Exception)
  async def internal(_, exc: Exception):
    return _error(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")

  @app.get("/health")
  async def health():
    return {"status": "ok", **engine.stats()}

  @app.get("/metrics")
  async def prometheus():
    return PlainTextResponse(prom.generate_latest(metrics.registry).decode(), media_type=prom.CONTENT_TYPE_LATEST)

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "psa_jax",
                                         "max_model_len": context}]}

  async def parse(request: Request) -> dict:
    raw = await request.body()
    try:
      body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
      raise BadRequest(f"request body is not valid UTF-8: {e}") from e
    except json.JSONDecodeError as e:
      raise BadRequest(f"request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
      raise BadRequest("request body must be a JSON object")
    name = body.get("model")
    if name is not None and name != model_name:
      raise BadRequest(f"model {name!r} does not exist; this server serves {model_name!r}", "model", 404,
                       "model_not_found")
    return body

  def sampling(body: dict, prompt_len: int) -> tuple[SamplingParams, list[str], dict]:
    default_max = max(1, min(256, context - prompt_len))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _field({"max_tokens": max_tokens}, "max_tokens", int, default_max, check=lambda v: v >= 1,
                        message="must be a positive integer")
    if prompt_len >= context:
      raise BadRequest(f"prompt is {prompt_len} tokens; the context is {context} tokens", "prompt")
    if prompt_len + max_tokens > context:
      raise BadRequest(f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context of {context} "
                       "tokens", "max_tokens")
    _field(body, "n", int, 1, check=lambda v: v == 1, message="must be 1 (n > 1 is not supported)")
    if body.get("logprobs") not in (None, False):
      raise BadRequest("logprobs are not supported", "logprobs")
    temperature = _field(body, "temperature", (int, float), 1.0, check=lambda v: 0 <= v <= 2,
                         message="must be a number in [0, 2]")
    top_p = _field(body, "top_p", (int, float), 1.0, check=lambda v: 0 < v <= 1, message="must be in (0, 1]")
    top_k = _field(body, "top_k", int, 0, check=lambda v: v >= -1, message="must be an integer >= -1")
    seed = _field(body, "seed", int, None, check=lambda v: 0 <= v < 2**31, message="must be in [0, 2**31)")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP_STRINGS:
      raise BadRequest(f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them", "stop")
    extra = _field(body, "psa", dict, {}, message="must be an object")
    attention = extra.get("attention")
    if attention is not None and attention not in ("dense", "topk", "psa"):
      raise BadRequest("'psa.attention' must be 'dense', 'topk' or 'psa'", "psa.attention")
    tau = extra.get("tau")
    if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau <= 1):
      raise BadRequest("'psa.tau' must be a number in (0, 1]", "psa.tau")
    ignore_eos = _field(body, "ignore_eos", bool, False, message="must be a boolean")
    params = SamplingParams(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
                            top_k=max(0, top_k), seed=seed if seed is not None else uuid.uuid4().int % 2**31,
                            ignore_eos=ignore_eos)
    return params, stops, {"attention": attention, "tau": tau}

  async def run(request: Request, body: dict, prompt_ids: list[int], chat: bool):
    params, stops, extra = sampling(body, len(prompt_ids))
    stream = _field(body, "stream", bool, False, message="must be a boolean")
    include_usage = bool(_field(body, "stream_options", dict, {}, message="must be an object").get("include_usage"))
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    listener = lambda req, tokens, finished: loop.call_soon_threadsafe(events.put_nowait, (tokens, finished))
    try:
      handle = engine.submit(prompt_ids, params, attention=extra["attention"], tau=extra["tau"], listener=listener)
    except ValueError as e:
      raise BadRequest(str(e)) from e
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    text = TextStream(tokenizer, stops)

    def usage():
      return {"prompt_tokens": len(prompt_ids), "completion_tokens": len(handle.output),
              "total_tokens": len(prompt_ids) + len(handle.output)}

    def finish_reason():
      if text.stopped or handle.finish_reason == "stop":
        return "stop"
      return "length" if handle.finish_reason == "length" else handle.finish_reason

    async def next_event():
      """The next engine event, or None when the client has gone (the request is then cancelled)."""
      while True:
        try:
          return await asyncio.wait_for(events.get(), timeout=0.5)
        except asyncio.TimeoutError:
          if await request.is_disconnected():
            engine.cancel(handle.id)
            return None

    def chunk(delta_text: str | None, reason: str | None, first: bool = False) -> str:
      if chat:
        delta = {"role": "assistant", "content": ""} if first else ({} if delta_text is None else {"content": delta_text})
        choice = {"index": 0, "delta": delta, "finish_reason": reason}
        obj = "chat.completion.chunk"
      else:
        choice = {"index": 0, "text": delta_text or "", "finish_reason": reason, "logprobs": None}
        obj = "text_completion"
      return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model_name,
                                     "choices": [choice]}) + "\n\n"

    outcome = {"completed": False}

    async def pieces():
      """New text as it is generated; ends when the request finishes or the client goes away."""
      try:
        while True:
          event = await next_event()
          if event is None:
            return
          tokens, finished = event
          if finished and handle.finish_reason == "error":
            raise BadRequest(f"generation failed: {handle.error}", status=500, kind="server_error")
          new = text.feed([t for t in tokens if t not in handle.stop_ids], finished)
          if new:
            yield new
          if text.stopped and not finished:
            engine.cancel(handle.id)  # a stop string ended it; the engine frees the pages
            finished = True
          if finished:
            outcome["completed"] = True
            return
      except asyncio.CancelledError:
        engine.cancel(handle.id)
        raise

    if stream:
      async def sse():
        try:
          if chat:
            yield chunk(None, None, first=True)
          async for piece in pieces():
            yield chunk(piece, None)
          if not outcome["completed"]:
            return
          yield chunk(None, finish_reason())
          if include_usage:
            yield "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                         "created": created, "model": model_name, "choices": [],
                                         "usage": usage()}) + "\n\n"
          yield "data: [DONE]\n\n"
        finally:
          if handle.done.is_set():
            metrics.finished(handle)

      return StreamingResponse(sse(), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async for _ in pieces():
      pass
    if not outcome["completed"]:
      return Response(status_code=499)  # the client went away; nobody reads this
    await asyncio.get_running_loop().run_in_executor(None, handle.done.wait, 5.0)
    metrics.finished(handle)
    final_text = _final_text(text)
    if chat:
      choice = {"index": 0, "message": {"role": "assistant", "content": final_text}, "finish_reason": finish_reason(),
                "logprobs": None}
      obj = "chat.completion"
    else:
      choice = {"index": 0, "text": final_text, "finish_reason": finish_reason(), "logprobs": None}
      obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model_name, "choices": [choice],
            "usage": usage()}

  @app.post("/v1/completions")
  async def completions(request: Request):
    body = await parse(request)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
      prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
      ids = prompt
    elif isinstance(prompt, str) and prompt:
      ids = tokenizer.encode(prompt)
    elif prompt is None:
      raise BadRequest("'prompt' is required", "prompt")
    else:
      raise BadRequest("'prompt' must be a non-empty string or a list of token ids", "prompt")
    return await run(request, body, ids, chat=False)

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    body = await parse(request)
    messages = body.get("messages")
    if messages is None:
      raise BadRequest("'messages' is required", "messages")
    if not isinstance(messages, list) or not messages:
      raise BadRequest("'messages' must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(messages):
      if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise BadRequest(f"messages[{i}] must be an object with a string 'role'", "messages")
      content = m.get("content")
      if isinstance(content, list):  # OpenAI's content parts: keep the text ones
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
          raise BadRequest(f"messages[{i}].content: only text parts are supported", "messages")
        content = "".join(p["text"] for p in content)
      if not isinstance(content, str):
        raise BadRequest(f"messages[{i}].content must be a string", "messages")
      clean.append({"role": m["role"], "content": content})
    try:
      prompt = tokenizer.apply_chat_template(clean, add_generation_prompt=True)
    except Exception as e:
      raise BadRequest(f"cannot render the chat template: {e}", "messages") from e
    return await run(request, body, tokenizer.encode(prompt), chat=True)

  return app


def _final_text(stream: TextStream) -> str:
  """All the text a finished request produced, cut at the first stop string."""
  text = stream.text
  for stop in stream.stops:
    at = text.find(stop)
    if at >= 0:
      text = text[:at]
  return text


def serve(engine: Engine, model_name: str, *, host: str, port: int, drain_timeout: float) -> None:
  """Runs the app under uvicorn until SIGINT/SIGTERM.

  On the signal the engine drains first (in-flight requests get `drain_timeout` seconds to finish, the rest are
  cancelled and their streams closed properly with [DONE]), so that uvicorn's own graceful shutdown, which
  waits for open connections, finds them ending instead of cutting them off.
  """
  import threading

  import uvicorn

  class Server(uvicorn.Server):
    def handle_exit(self, sig, frame):
      threading.Thread(target=engine.stop, kwargs={"drain_timeout": drain_timeout}, daemon=True).start()
      super().handle_exit(sig, frame)

  # uvicorn stops waiting for open connections after timeout_graceful_shutdown and cuts them. The cancelled
  # streams end only once the engine finishes the device call it is in (a decode window, or a compilation on a
  # new shape: several seconds on a loaded CPU), so the margin past the drain is generous; a shutdown with no
  # open stream does not wait for it.
  config = uvicorn.Config(create_app(engine, model_name, drain_timeout=drain_timeout), host=host, port=port,
                          log_level="warning", timeout_graceful_shutdown=int(drain_timeout) + 30)
  Server(config).run()
