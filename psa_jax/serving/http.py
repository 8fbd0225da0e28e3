"""The OpenAI-compatible HTTP front (FastAPI on uvicorn) over an `Engine` running on its own thread.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with "stream": true as server-sent events),
GET /v1/models and /v1/models/{id}, POST /tokenize, POST /detokenize and GET /tokenizer_info (vLLM's shapes),
GET /health, GET /metrics (Prometheus text). What a body may carry, and what is refused, is in protocol.py.

Structured output: `response_format` (json_object, json_schema) and vLLM's `guided_json`, `guided_regex`,
`guided_choice` and `structured_outputs` are compiled into token automata (grammar.py) that the decode window
applies on the device. Tool calls (tools.py) where the model's chat template renders tools.

Beyond OpenAI's fields, a request body may carry "psa": {"attention": "dense"|"topk"|"psa", "tau": 0.9} to pick
the attention and PSA's threshold for that request alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import signal
import threading
import time
import uuid

import prometheus_client as prom
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from psa_jax.serving import grammar, tools
from psa_jax.serving.engine import Engine
from psa_jax.serving.metrics import Metrics
from psa_jax.serving.protocol import (BadRequest, GenerationDefaults, TextStream, chat_logprobs, chat_messages,
                                      completion_logprobs, completion_prompts, error_body, field, parse_generation)

FINGERPRINT = "psa_jax"
MAX_BODY_BYTES = 4 * 2**20  # a full context of token ids, in a batch of prompts, is far below this
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
TOKENIZER_ROUTES = ("/tokenize", "/detokenize", "/tokenizer_info")
CLIENT_GONE = object()  # an event: the client closed the connection


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
  return JSONResponse(error_body(message, param, kind), status_code=status)


def _hostname(header: str) -> str:
  """"127.0.0.1:8000" -> "127.0.0.1", "[::1]:8000" -> "[::1]"."""
  if header.startswith("["):
    return header.split("]")[0] + "]"
  return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class _Choice:
  """One choice of a response: an engine request, its text so far and what has been sent of it."""

  def __init__(self, index: int, prompt: list[int], tokenizer, stops: list[str]):
    self.index, self.prompt, self.handle = index, prompt, None
    self.text = TextStream(tokenizer, stops)
    self.logprobs: list = []  # of the tokens fed to `text`
    self.done = False

  def finish_reason(self) -> str:
    # OpenAI's reasons only: a request the server cancelled (a stop string, shutdown) ends as "stop".
    if self.text.stopped or self.handle.finish_reason in ("stop", "cancelled"):
      return "stop"
    return "length"

  def used(self) -> int:
    return self.text.tokens_used()


def create_app(engine: Engine, model_name: str, *, drain_timeout: float = 10.0,
               defaults: GenerationDefaults = GenerationDefaults(), api_key: str | None = None,
               loopback_only: bool = False, read_timeout: float = 30.0) -> FastAPI:
  """loopback_only: the server listens on a loopback address, so a Host header naming anything else is a web
  page's request through DNS rebinding and is refused. api_key: required as `Authorization: Bearer` on the API
  routes (not /health or /metrics), as `vllm serve --api-key` does. read_timeout: seconds a request's body may
  take to arrive (`serve` gives its headers the same)."""
  metrics = Metrics(engine)
  tokenizer = engine.tokenizer
  context = engine.config.cache.max_context
  eos_ids = tuple(tokenizer.eos_token_ids)
  vocab = engine.model.config.vocab_size

  async def lifespan(app):
    engine.start()
    yield
    engine.stop(drain_timeout=drain_timeout)  # SIGTERM: finish what is in flight, cancel the rest

  app = FastAPI(title="psa_jax", lifespan=lifespan)
  app.state.draining = False  # set on SIGTERM: in-flight requests finish, new ones get 503

  @app.middleware("http")
  async def guard(request: Request, call_next):
    """Checks that need no body, before any work: Host, API key, media type, size, shutdown."""
    if loopback_only and _hostname(request.headers.get("host", "")) not in LOOPBACK_HOSTS:
      return _error(400, "this server answers only requests addressed to a loopback host", "host")
    api = request.url.path.startswith("/v1") or request.url.path in TOKENIZER_ROUTES
    if api and api_key is not None:
      given = request.headers.get("authorization", "")
      if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
        return _error(401, "missing or incorrect API key (send 'Authorization: Bearer <key>')",
                      kind="authentication_error")
    if request.method == "POST":
      media = request.headers.get("content-type", "").split(";")[0].strip().lower()
      if media != "application/json":
        return _error(415, "request bodies must be application/json", "content-type")
      length = request.headers.get("content-length")
      if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        return _error(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
      if app.state.draining and api:
        return _error(503, "the server is shutting down", kind="service_unavailable")
    rid = request.headers.get("x-request-id") or uuid.uuid4().hex
    response = await call_next(request)
    response.headers["x-request-id"] = rid[:128]
    return response

  @app.exception_handler(BadRequest)
  async def bad_request(_, exc: BadRequest):
    return _error(exc.status, exc.message, exc.param, exc.kind)

  @app.exception_handler(HTTPException)
  async def http_error(_, exc: HTTPException):
    kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
    return _error(exc.status_code, str(exc.detail), kind=kind)

  @app.exception_handler(RequestValidationError)
  async def validation_error(_, exc: RequestValidationError):
    return _error(400, "request does not match the endpoint's schema")

  @app.exception_handler(Exception)
  async def internal(_, exc: Exception):
    return _error(500, f"internal error ({type(exc).__name__})", kind="server_error")

  @app.get("/health")
  async def health():
    return {"status": "ok", **engine.stats()}

  @app.get("/metrics")
  async def prometheus():
    return PlainTextResponse(prom.generate_latest(metrics.registry).decode(), media_type=prom.CONTENT_TYPE_LATEST)

  def model_card():
    return {"id": model_name, "object": "model", "created": 0, "owned_by": "psa_jax", "max_model_len": context}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [model_card()]}

  @app.get("/v1/models/{name:path}")
  async def model(name: str):
    if name != model_name:
      raise BadRequest(f"model {name!r} does not exist; this server serves {model_name!r}", "model", 404,
                       "model_not_found")
    return model_card()

  async def read_body(request: Request) -> bytes:
    raw = bytearray()
    async for piece in request.stream():  # a body without a Content-Length is capped as it arrives
      raw += piece
      if len(raw) > MAX_BODY_BYTES:
        raise BadRequest(f"request body is larger than {MAX_BODY_BYTES} bytes", status=413)
    return bytes(raw)

  async def parse(request: Request) -> dict:
    try:  # a client that sends its body slowly, or never, does not hold the connection forever
      raw = await asyncio.wait_for(read_body(request), read_timeout)
    except asyncio.TimeoutError:
      raise BadRequest(f"request body not received within {read_timeout:g} s", status=408) from None
    try:
      body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
      raise BadRequest(f"request body is not valid UTF-8: {e}") from e
    except (json.JSONDecodeError, RecursionError) as e:
      raise BadRequest("request body is not valid JSON" + (f": {e}" if isinstance(e, json.JSONDecodeError) else
                                                           " (nested too deeply)")) from e
    if not isinstance(body, dict):
      raise BadRequest("request body must be a JSON object")
    try:  # JSON may spell lone UTF-16 surrogates, which no tokenizer can take
      json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
      raise BadRequest("request body holds text that is not valid Unicode (a lone surrogate)") from e
    name = body.get("model")
    if name is not None and name != model_name:
      raise BadRequest(f"model {name!r} does not exist; this server serves {model_name!r}", "model", 404,
                       "model_not_found")
    return body

  async def run(request: Request, body: dict, prompts: list[list[int]], chat: bool,
                tool_request: tools.ToolRequest | None = None):
    try:
      forced = tool_request.constraint() if tool_request is not None else None
    except tools.ToolError as e:
      raise BadRequest(str(e), e.param) from e
    gen = parse_generation(body, chat=chat, prompt_len=max(len(p) for p in prompts), context=context,
                           defaults=defaults, eos_ids=eos_ids, forced_constraint=forced)
    calling = tool_request is not None and tool_request.active  # output is searched for tool calls
    if gen.constraint is not None:  # compiling a grammar takes up to seconds: off the event loop
      name, kind, value = gen.constraint
      try:
        automaton = await asyncio.to_thread(
            lambda: grammar.compile_regex(tokenizer, vocab, grammar.regex_for(kind, value)))
      except grammar.GrammarError as e:
        raise BadRequest(f"'{name}': {e}", name) from e
      gen = dataclasses.replace(gen, params=dataclasses.replace(gen.params, grammar=automaton))
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    choices = [_Choice(i * gen.n + j, p, tokenizer, gen.stops) for i, p in enumerate(prompts) for j in range(gen.n)]

    def listener_for(choice):
      return lambda req, tokens, finished: loop.call_soon_threadsafe(events.put_nowait, (choice, tokens, finished))

    submitted = []
    try:
      for i, prompt in enumerate(prompts):
        group = choices[i * gen.n : (i + 1) * gen.n]
        handles = engine.submit_n(prompt, gen.params, gen.n, attention=gen.attention, tau=gen.tau,
                                  listeners=[listener_for(c) for c in group])
        for c, h in zip(group, handles):
          c.handle = h
          submitted.append(h)
    except ValueError as e:
      for h in submitted:
        engine.cancel(h.id)
      raise BadRequest(str(e)) from e
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"

    def cancel_all():
      for c in choices:
        if not c.done:
          engine.cancel(c.handle.id)

    def usage():
      prompt_tokens = sum(len(p) for p in prompts)
      completion = sum(c.used() for c in choices)
      return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
              "total_tokens": prompt_tokens + completion}

    def logprobs_of(c, ids, entries):
      if gen.logprobs is None:
        return None
      if chat:
        return chat_logprobs(tokenizer, ids, entries, gen.logprobs)
      return completion_logprobs(tokenizer, ids, entries, gen.logprobs)

    async def next_event():
      """The next engine event, or None when the client has gone (the requests are then cancelled)."""
      while True:
        try:
          event = await asyncio.wait_for(events.get(), timeout=0.5)
        except asyncio.TimeoutError:
          if not await request.is_disconnected():
            continue
          event = CLIENT_GONE
        if event is CLIENT_GONE:
          cancel_all()
          return None
        return event

    async def watch_disconnect():
      """Reports a client that hangs up at once, not at the next quiet moment. (A stream's hang-up also
      cancels the response, through Starlette.)"""
      while (await request.receive())["type"] != "http.disconnect":
        pass
      events.put_nowait(CLIENT_GONE)

    async def pieces():
      """(choice, new text, new token ids, their logprobs, finished) as tokens arrive; ends when every choice is
      done or the client has gone."""
      try:
        while not all(c.done for c in choices):
          event = await next_event()
          if event is None:
            return
          c, tokens, finished = event
          if c.done:
            continue
          if finished and c.handle.finish_reason == "error":
            raise BadRequest(f"generation failed: {c.handle.error}", status=500, kind="server_error")
          start = len(c.text.ids)
          fed = [t for t in tokens if t not in c.handle.stop_ids]
          new = c.text.feed(fed, finished)
          if c.text.stopped and not finished:
            engine.cancel(c.handle.id)  # a stop string ended it; the engine frees the pages
            finished = True
          ids = c.text.ids[start : c.used()] if c.text.stopped else fed
          entries = c.handle.logprobs[start : start + len(ids)] if gen.logprobs is not None else []
          c.done = finished
          yield c, new, ids, entries, finished
      except asyncio.CancelledError:
        cancel_all()
        raise

    def chunk(c, text: str | None, reason: str | None, logprobs=None, first: bool = False, calls=None) -> str:
      if chat:
        delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
        if calls:
          delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
        choice = {"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
      else:
        choice = {"index": c.index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
      return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model_name,
                                     "system_fingerprint": FINGERPRINT, "choices": [choice]}) + "\n\n"

    def _echo_logprobs(c):
      if gen.logprobs is None:
        return None
      return completion_logprobs(tokenizer, c.prompt, c.handle.prompt_logprobs[: len(c.prompt)], gen.logprobs)

    if gen.stream:
      async def sse():
        try:
          if chat:
            for c in choices:
              yield chunk(c, None, None, first=True)
          elif gen.echo:
            for c in choices:
              yield chunk(c, tokenizer.decode(c.prompt), None, _echo_logprobs(c))
          async for c, new, ids, entries, finished in pieces():
            lp = logprobs_of(c, ids, entries) if ids and gen.logprobs is not None else None
            if calling:  # whether the text is a call is known at the end: it is sent then, whole
              c.logprobs.extend(entries)
              if finished:
                content, calls = tool_request.parse(c.text.text)
                lp = logprobs_of(c, c.text.ids[: c.used()], c.logprobs) if gen.logprobs is not None else None
                if content or lp or calls:
                  yield chunk(c, content, None, lp, calls=calls)
                yield chunk(c, None, "tool_calls" if calls else c.finish_reason())
              continue
            if new or lp:
              yield chunk(c, new, None, lp)
            if finished:
              yield chunk(c, None, c.finish_reason())
          if not all(c.done for c in choices):
            return
          if gen.include_usage:
            yield "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model_name,
                                         "system_fingerprint": FINGERPRINT, "choices": [], "usage": usage()}) + "\n\n"
          yield "data: [DONE]\n\n"
        except BadRequest as e:  # the stream has begun: report in band, then end it properly
          yield "data: " + json.dumps(error_body(e.message, e.param, e.kind)) + "\n\n"
          yield "data: [DONE]\n\n"
        finally:
          for c in choices:
            if c.handle.done.is_set():
              metrics.finished(c.handle)

      return StreamingResponse(sse(), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    watcher = asyncio.create_task(watch_disconnect())
    try:
      async for _ in pieces():
        pass
    finally:
      watcher.cancel()
    if not all(c.done for c in choices):
      return Response(status_code=499)  # the client went away; nobody reads this
    for c in choices:
      await asyncio.get_running_loop().run_in_executor(None, c.handle.done.wait, 5.0)
      metrics.finished(c.handle)
    out = []
    for c in choices:
      ids = c.text.ids[: c.used()]
      entries = c.handle.logprobs[: len(ids)] if gen.logprobs is not None else []
      if chat:
        message, reason = {"role": "assistant", "content": c.text.text}, c.finish_reason()
        if calling:
          message["content"], calls = tool_request.parse(c.text.text)
          if calls:
            message["tool_calls"], reason = calls, "tool_calls"
        out.append({"index": c.index, "message": message, "logprobs": logprobs_of(c, ids, entries),
                    "finish_reason": reason})
        continue
      text, lp = c.text.text, logprobs_of(c, ids, entries)
      if gen.echo:
        prompt_text = tokenizer.decode(c.prompt)
        if lp is not None:
          echo = _echo_logprobs(c)
          lp = {k: echo[k] + lp[k] for k in ("tokens", "token_logprobs", "top_logprobs")}
          lp["text_offset"] = echo["text_offset"] + [len(prompt_text) + o for o in
                                                     completion_logprobs(tokenizer, ids, entries, 0)["text_offset"]]
        text = prompt_text + text
      out.append({"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason()})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model_name, "system_fingerprint": FINGERPRINT, "choices": out, "usage": usage()}

  @app.post("/v1/completions")
  async def completions(request: Request):
    body = await parse(request)
    if body.get("tools") or body.get("tool_choice") not in (None, "none"):
      raise BadRequest("'tools' is a chat completions field", "tools")
    prompts = await asyncio.to_thread(completion_prompts, body, tokenizer.encode)
    return await run(request, body, prompts, chat=False)

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    body = await parse(request)
    try:
      tool_request = tools.parse_request(body, tokenizer.chat_template)
    except tools.ToolError as e:
      raise BadRequest(str(e), e.param) from e
    messages = chat_messages(body, tools_ok=tools.supported(tokenizer.chat_template))

    def render():
      try:
        return tokenizer.encode_chat(messages, add_generation_prompt=True,
                                     tools=tool_request.template_tools() if tool_request else None)
      except Exception as e:
        raise BadRequest(f"cannot render the chat template: {type(e).__name__}", "messages") from e

    return await run(request, body, [await asyncio.to_thread(render)], chat=True, tool_request=tool_request)

  @app.post("/tokenize")
  async def tokenize(request: Request):
    body = await parse(request)
    if "messages" in body:
      messages = chat_messages(body, tools_ok=tools.supported(tokenizer.chat_template))
      add = field(body, "add_generation_prompt", bool, True, message="a boolean")
      tokens = await asyncio.to_thread(tokenizer.encode_chat, messages, add_generation_prompt=add)
    else:
      text = field(body, "prompt", str, None, message="a string")
      if text is None:
        raise BadRequest("'prompt' or 'messages' is required", "prompt")
      special = field(body, "add_special_tokens", bool, True, message="a boolean")
      tokens = await asyncio.to_thread(tokenizer.encode, text, add_bos=None if special else False)
    return {"count": len(tokens), "max_model_len": context, "tokens": tokens}

  @app.get("/tokenizer_info")
  async def tokenizer_info():
    """vLLM's description of the tokenizer, with which clients (lm-eval's remote tokenizer) tokenize through
    /tokenize and render chats themselves."""
    name = lambda i: None if i is None else tokenizer.token(i)
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context,
            "eos_token": name(eos_ids[0]) if eos_ids else None, "bos_token": name(tokenizer.bos_token_id),
            "pad_token": None, "chat_template": tokenizer.chat_template, "vocab_size": tokenizer.vocab_size}

  @app.post("/detokenize")
  async def detokenize(request: Request):
    body = await parse(request)
    tokens = body.get("tokens")
    vocab = engine.model.config.vocab_size
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                               for t in tokens):
      raise BadRequest(f"'tokens' must be a list of token ids in [0, {vocab})", "tokens")
    return {"prompt": await asyncio.to_thread(tokenizer.decode, tokens)}

  return app


def serve(engine: Engine, model_name: str, *, host: str, port: int, drain_timeout: float,
          defaults: GenerationDefaults = GenerationDefaults(), api_key: str | None = None,
          read_timeout: float = 30.0) -> None:
  """Runs the app under uvicorn until SIGINT/SIGTERM, then exits normally.

  On the signal new requests get 503 and the engine drains first (in-flight requests get `drain_timeout`
  seconds to finish, the rest are cancelled and their streams closed properly with [DONE]); only then does
  uvicorn's own graceful shutdown begin, which waits for the open connections, now ending, instead of cutting
  them off. A second signal stops at once.
  """
  import uvicorn

  app = create_app(engine, model_name, drain_timeout=drain_timeout, defaults=defaults, api_key=api_key,
                   loopback_only=host in LOOPBACK_HOSTS, read_timeout=read_timeout)

  class Server(uvicorn.Server):
    def handle_exit(self, sig, frame):
      if app.state.draining:  # a second signal: stop now
        super().handle_exit(sig, frame)
        return
      app.state.draining = True

      def drain():  # uvicorn keeps listening meanwhile, so late requests get a 503 rather than a refusal
        engine.stop(drain_timeout=drain_timeout)
        super(Server, self).handle_exit(sig, frame)

      threading.Thread(target=drain, daemon=True).start()

    @contextlib.contextmanager
    def capture_signals(self):
      # uvicorn's own version re-raises the signal after shutting down, so a clean stop would exit with 143.
      if threading.current_thread() is not threading.main_thread():
        yield
        return
      previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
      try:
        yield
      finally:
        for sig, handler in previous.items():
          signal.signal(sig, handler)

  # uvicorn stops waiting for open connections after timeout_graceful_shutdown and cuts them. The cancelled
  # streams end only once the engine finishes the device call it is in (a decode window, or a compilation on a
  # new shape: several seconds on a loaded CPU), so the margin past the drain is generous; a shutdown with no
  # open stream does not wait for it.
  config = uvicorn.Config(app, host=host, port=port, log_level="warning", http=_protocol_with_header_deadline(read_timeout),
                          timeout_graceful_shutdown=int(drain_timeout) + 30, timeout_keep_alive=5)
  Server(config).run()


def _protocol_with_header_deadline(seconds: float):
  """uvicorn's HTTP/1.1 protocol with a deadline on a request's headers: a client that trickles them
  (slowloris) is cut off after `seconds` instead of holding a socket forever. uvicorn has its keep-alive
  timeout, but any byte received resets that."""
  from uvicorn.protocols.http.h11_impl import H11Protocol

  class Protocol(H11Protocol):
    def connection_made(self, transport):
      super().connection_made(transport)
      self._arm_header_deadline()

    def on_response_complete(self):
      super().on_response_complete()
      self._arm_header_deadline()

    def connection_lost(self, exc):
      if getattr(self, "_header_deadline", None) is not None:
        self._header_deadline.cancel()
      super().connection_lost(exc)

    def _arm_header_deadline(self):
      if getattr(self, "_header_deadline", None) is not None:
        self._header_deadline.cancel()
      self._header_deadline = self.loop.call_later(seconds, self._headers_overdue, self.cycle)

    def _headers_overdue(self, cycle_then):
      if self.cycle is cycle_then and not self.transport.is_closing():  # no new request has begun since
        self.transport.close()

  return Protocol
