"""The OpenAI protocol, apart from the HTTP plumbing: request bodies checked and turned into engine settings,
and the pieces of responses (log-probabilities, text cut at stop strings, usage).

Every field a request may carry is either honoured or refused with a 400 that names it: a client never gets an
answer that silently ignored what it asked for.
"""

from __future__ import annotations

import dataclasses
import json
import uuid

from psa_jax.config import check_tau
from psa_jax.serving import tools
from psa_jax.serving.request import MAX_LOGPROBS, SamplingParams, TokenLogprob

MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 256  # characters; the hold-back check is quadratic in it
MAX_N = 16
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's limit
MAX_SCHEMA_CHARS = 65536  # a JSON schema or regex, as text
MAX_CHOICES = 256
MAX_MESSAGES = 1024
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class BadRequest(Exception):
  def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"):
    super().__init__(message)
    self.message, self.param, self.status, self.kind = message, param, status, kind


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
  return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def field(body: dict, name: str, kinds, default, *, check=None, message=""):
  """body[name] if present and not null, checked for type (bools are not numbers) and by `check`."""
  value = body.get(name, default)
  if value is None:
    return default
  kinds = kinds if isinstance(kinds, tuple) else (kinds,)
  if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
    raise BadRequest(f"'{name}' must be {message or ' or '.join(k.__name__ for k in kinds)}, got "
                     f"{type(value).__name__}", name)
  if check is not None and not check(value):
    raise BadRequest(f"'{name}' {message}, got {value!r}", name)
  return value


# Fields psa_jax does not implement, and the values that would need them. Anything else is refused by name.
def _unsupported(body: dict) -> str | None:
  checks = {
      "functions": lambda v: bool(v), "function_call": lambda v: v not in ("none", None),
      "logit_bias": lambda v: bool(v), "suffix": lambda v: bool(v), "prediction": lambda v: bool(v),
      "audio": lambda v: bool(v), "modalities": lambda v: v != ["text"], "web_search_options": lambda v: bool(v),
      "guided_grammar": lambda v: True,
  }
  for name, refused in checks.items():
    if body.get(name) is not None and refused(body[name]):
      return name
  return None


def _constraint(body: dict) -> tuple[str, str, object] | None:
  """(field, kind, value) of the output constraint a body asks for, if any: OpenAI's `response_format`, or
  vLLM's `guided_json` / `guided_regex` / `guided_choice` / `structured_outputs`. Kinds as grammar.regex_for."""
  found = []
  fmt = body.get("response_format")
  if fmt is not None:
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
      raise BadRequest("'response_format' must be an object whose 'type' is 'text', 'json_object' or "
                       "'json_schema'", "response_format")
    if fmt["type"] == "json_object":
      found.append(("response_format", "json_object", None))
    elif fmt["type"] == "json_schema":
      spec = fmt.get("json_schema")
      if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise BadRequest("'response_format.json_schema' must be an object with a 'schema' object",
                         "response_format")
      schema = spec.get("schema")
      found.append(("response_format", "json_schema", schema) if schema else ("response_format", "json_object", None))
  outputs = body.get("structured_outputs")
  if outputs is not None:
    if not isinstance(outputs, dict) or set(outputs) - {"json", "regex", "choice"}:
      raise BadRequest("'structured_outputs' may hold 'json', 'regex' or 'choice' (grammars are not supported)",
                       "structured_outputs")
    found += [("structured_outputs", k, v) for k, v in outputs.items() if v is not None]
  found += [(name, name.removeprefix("guided_"), body[name]) for name in ("guided_json", "guided_regex",
                                                                          "guided_choice") if body.get(name) is not None]
  if len(found) > 1:
    raise BadRequest(f"ask for one output constraint, not {len(found)}", found[1][0])
  if not found:
    return None
  name, kind, value = found[0]
  if kind == "json":
    kind = "json_schema"
    if isinstance(value, str):
      try:
        value = json.loads(value)
      except json.JSONDecodeError as e:
        raise BadRequest(f"'{name}' is not valid JSON: {e}", name) from e
  if kind == "json_schema" and (not isinstance(value, dict) or len(json.dumps(value)) > MAX_SCHEMA_CHARS):
    raise BadRequest(f"'{name}' must be a JSON schema object of at most {MAX_SCHEMA_CHARS} characters", name)
  if kind == "regex" and (not isinstance(value, str) or not 0 < len(value) <= MAX_SCHEMA_CHARS):
    raise BadRequest(f"'{name}' must be a regular expression of at most {MAX_SCHEMA_CHARS} characters", name)
  if kind == "choice" and (not isinstance(value, list) or not 0 < len(value) <= MAX_CHOICES
                           or not all(isinstance(c, str) and 0 < len(c) <= MAX_STOP_LENGTH for c in value)):
    raise BadRequest(f"'{name}' must be a list of at most {MAX_CHOICES} non-empty strings", name)
  return name, kind, value


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
  """What a request that leaves a sampling field out gets: the model's generation_config.json where it has one,
  else the server's flags (whose defaults are llama.cpp's server's, which give sensible text on small models)."""

  temperature: float = 0.8
  top_p: float = 0.95
  top_k: int = 40
  min_p: float = 0.05
  repetition_penalty: float = 1.0

  def merged(self, generation_config: dict) -> "GenerationDefaults":
    """These, overridden by a model's generation_config.json fields (those it sets)."""
    known = {f.name: f.type for f in dataclasses.fields(self)}
    found = {k: v for k, v in generation_config.items() if k in known and isinstance(v, (int, float))
             and not isinstance(v, bool)}
    if generation_config.get("do_sample") is False:
      found["temperature"] = 0.0
    return dataclasses.replace(self, **found)

  def describe(self) -> str:
    return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))


@dataclasses.dataclass(frozen=True)
class Generation:
  """A request's settings, checked."""

  params: SamplingParams
  stops: list[str]
  n: int
  stream: bool
  include_usage: bool
  echo: bool
  logprobs: int | None  # alternatives per token, or None for no log-probabilities
  attention: str | None
  tau: float | None
  constraint: tuple[str, str, object] | None = None  # (field, kind, value): compiled into params.grammar


def parse_generation(body: dict, *, chat: bool, prompt_len: int, context: int, defaults: GenerationDefaults,
                     eos_ids: tuple[int, ...], forced_constraint: tuple | None = None) -> Generation:
  """The settings of a completions or chat completions body whose longest prompt is `prompt_len` tokens.
  `stop_token_ids` add to the model's end-of-sequence tokens `eos_ids`, as in vLLM. forced_constraint: an output
  constraint the request implies besides its own fields (a forced tool call)."""
  name = _unsupported(body)
  if name is not None:
    raise BadRequest(f"'{name}' is not supported by this server", name)
  max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
  default_max = max(1, min(256, context - prompt_len))
  max_tokens = field({"max_tokens": max_tokens}, "max_tokens", int, default_max, check=lambda v: 1 <= v <= context,
                     message=f"must be an integer in [1, {context}]")
  if prompt_len >= context:
    raise BadRequest(f"prompt is {prompt_len} tokens; the context is {context} tokens", "prompt")
  if prompt_len + max_tokens > context:
    raise BadRequest(f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context of {context} "
                     "tokens", "max_tokens")
  n = field(body, "n", int, 1, check=lambda v: 1 <= v <= MAX_N, message=f"must be an integer in [1, {MAX_N}]")
  field(body, "best_of", int, n, check=lambda v: v == n, message="must equal n (best_of is not supported)")
  echo = field(body, "echo", bool, False, message="a boolean")
  if echo and chat:
    raise BadRequest("'echo' is a completions field", "echo")
  if chat:
    want = field(body, "logprobs", bool, False, message="a boolean")
    top = field(body, "top_logprobs", int, 0, check=lambda v: 0 <= v <= MAX_LOGPROBS,
                message=f"must be an integer in [0, {MAX_LOGPROBS}]")
    if top and not want:
      raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    logprobs = top if want else None
  else:
    logprobs = field(body, "logprobs", int, None, check=lambda v: 0 <= v <= MAX_COMPLETION_LOGPROBS,
                     message=f"must be an integer in [0, {MAX_COMPLETION_LOGPROBS}]")
  number = (int, float)
  temperature = field(body, "temperature", number, defaults.temperature, check=lambda v: 0 <= v <= 2,
                      message="must be a number in [0, 2]")
  top_p = field(body, "top_p", number, defaults.top_p, check=lambda v: 0 < v <= 1, message="must be in (0, 1]")
  top_k = field(body, "top_k", int, defaults.top_k, check=lambda v: -1 <= v <= 2**20,
                message="must be an integer in [-1, 2**20]")
  min_p = field(body, "min_p", number, defaults.min_p, check=lambda v: 0 <= v <= 1, message="must be in [0, 1]")
  presence = field(body, "presence_penalty", number, 0.0, check=lambda v: -2 <= v <= 2, message="must be in [-2, 2]")
  frequency = field(body, "frequency_penalty", number, 0.0, check=lambda v: -2 <= v <= 2,
                    message="must be in [-2, 2]")
  repetition = field(body, "repetition_penalty", number, defaults.repetition_penalty, check=lambda v: 0 < v <= 2,
                     message="must be in (0, 2]")
  min_tokens = field(body, "min_tokens", int, 0, check=lambda v: 0 <= v <= max_tokens,
                     message="must be an integer in [0, max_tokens]")
  seed = field(body, "seed", int, None, check=lambda v: 0 <= v < 2**31, message="must be in [0, 2**31)")
  ignore_eos = field(body, "ignore_eos", bool, False, message="a boolean")
  stop_ids = field(body, "stop_token_ids", list, None, message="a list of token ids")
  if stop_ids is not None and (len(stop_ids) > MAX_STOP_STRINGS
                               or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31
                                          for t in stop_ids)):
    raise BadRequest(f"'stop_token_ids' must be a list of at most {MAX_STOP_STRINGS} token ids", "stop_token_ids")
  stop = body.get("stop")
  stops = [stop] if isinstance(stop, str) else stop or []
  if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
      or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH for s in stops)):
    raise BadRequest(f"'stop' must be a non-empty string of at most {MAX_STOP_LENGTH} characters or a list of at "
                     f"most {MAX_STOP_STRINGS} of them", "stop")
  stream = field(body, "stream", bool, False, message="a boolean")
  include_usage = bool(field(body, "stream_options", dict, {}, message="an object").get("include_usage"))
  extra = field(body, "psa", dict, {}, message="an object")
  attention = extra.get("attention")
  if attention is not None and attention not in ("dense", "topk", "psa"):
    raise BadRequest("'psa.attention' must be 'dense', 'topk' or 'psa'", "psa.attention")
  tau = extra.get("tau")
  if tau is not None:
    try:
      tau = check_tau(tau, "'psa.tau'")
    except ValueError as e:
      raise BadRequest(str(e), "psa.tau") from e
  stop_token_ids = None if stop_ids is None else tuple(dict.fromkeys((*eos_ids, *stop_ids)))
  constraint = _constraint(body)
  if forced_constraint is not None:
    if constraint is not None:
      raise BadRequest(f"'{constraint[0]}' cannot be combined with a forced tool call", constraint[0])
    constraint = forced_constraint
  if constraint is not None and ignore_eos:
    raise BadRequest("'ignore_eos' cannot be combined with constrained output, which ends at end-of-sequence",
                     "ignore_eos")
  params = SamplingParams(
      max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), top_k=max(0, top_k),
      seed=seed if seed is not None else uuid.uuid4().int % 2**31, ignore_eos=ignore_eos, min_tokens=min_tokens,
      min_p=float(min_p), presence_penalty=float(presence), frequency_penalty=float(frequency),
      repetition_penalty=float(repetition), logprobs=logprobs,
      prompt_logprobs=logprobs if echo and logprobs is not None else None,
      stop_token_ids=stop_token_ids)
  return Generation(params, stops, n, stream, include_usage, echo, logprobs, attention, tau, constraint)


def chat_messages(body: dict, *, tools_ok: bool = False) -> list[dict]:
  """The conversation, with text content only and OpenAI's roles (developer speaks as system). tools_ok: the
  chat template renders tools, so tool results and assistant tool calls may appear (tools.py)."""
  messages = body.get("messages")
  if messages is None:
    raise BadRequest("'messages' is required", "messages")
  if not isinstance(messages, list) or not messages or len(messages) > MAX_MESSAGES:
    raise BadRequest(f"'messages' must be a non-empty list of at most {MAX_MESSAGES} messages", "messages")
  clean = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
      raise BadRequest(f"messages[{i}] must be an object with a string 'role'", "messages")
    calls = m["role"] == "tool" or (m["role"] == "assistant" and bool(m.get("tool_calls")))
    if calls and not tools_ok:
      raise BadRequest(f"messages[{i}]: tool calls need a chat template that renders them; this model's does not",
                       "messages")
    if m.get("function_call"):
      raise BadRequest(f"messages[{i}]: the legacy 'function_call' is not supported; use 'tool_calls'", "messages")
    if m["role"] not in ROLES and not (m["role"] == "tool" and tools_ok):
      raise BadRequest(f"messages[{i}].role must be one of {sorted(ROLES)}, got {m['role']!r}", "messages")
    content = m.get("content")
    if content is None and calls and m["role"] == "assistant":  # an assistant turn that only called tools
      content = ""
    if isinstance(content, list):  # OpenAI's content parts: text ones only
      if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        raise BadRequest(f"messages[{i}].content: only text parts are supported", "messages")
      content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
      raise BadRequest(f"messages[{i}].content must be a string", "messages")
    if calls:
      try:
        clean.append(tools.template_message({**m, "content": content}, i))
      except tools.ToolError as e:
        raise BadRequest(str(e), e.param) from e
      continue
    clean.append({"role": ROLES[m["role"]], "content": content})
  return clean


def completion_prompts(body: dict, encode) -> list[list[int]]:
  """The prompts of a completions body: a string, a list of token ids, or a batch of either."""
  prompt = body.get("prompt")
  if prompt is None:
    raise BadRequest("'prompt' is required", "prompt")
  is_ids = lambda p: isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
  if isinstance(prompt, str) and prompt:
    return [encode(prompt)]
  if is_ids(prompt):
    return [prompt]
  if isinstance(prompt, list) and prompt and len(prompt) <= MAX_N:
    if all(isinstance(p, str) and p for p in prompt):
      return [encode(p) for p in prompt]
    if all(is_ids(p) for p in prompt):
      return list(prompt)
  raise BadRequest(f"'prompt' must be a non-empty string, a list of token ids, or a list of at most {MAX_N} of "
                   "either", "prompt")


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
    """All the text, cut at the first stop string."""
    text = self.tokenizer.decode(self.ids)
    for stop in self.stops:
      at = text.find(stop)
      if at >= 0:
        text = text[:at]
    return text

  def tokens_used(self) -> int:
    """Tokens up to and including the one that completed a stop string (all of them when none did): what
    `usage.completion_tokens` counts."""
    if not self.stopped:
      return len(self.ids)
    lo, hi = 1, len(self.ids)  # the first prefix whose text holds a stop string
    while lo < hi:
      mid = (lo + hi) // 2
      text = self.tokenizer.decode(self.ids[:mid])
      if any(stop in text for stop in self.stops):
        hi = mid
      else:
        lo = mid + 1
    return lo


def _token_text(tokenizer, token: int) -> str:
  return tokenizer.decode([token], skip_special_tokens=False)


def chat_logprobs(tokenizer, ids: list[int], entries: list[TokenLogprob], top: int) -> dict:
  """Chat completions' `logprobs` object for these tokens."""
  def item(token, logprob):
    text = _token_text(tokenizer, token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
  return {"content": [{**item(t, e.logprob), "top_logprobs": [item(i, v) for i, v in e.top[:top]]}
                      for t, e in zip(ids, entries)]}


def completion_logprobs(tokenizer, ids: list[int], entries: list[TokenLogprob | None], top: int,
                        offset: int = 0) -> dict:
  """The completions API's `logprobs` object: tokens, their logprobs (None for a first prompt token), the top
  alternatives as {token: logprob}, and each token's offset in the text."""
  tokens, offsets, at = [], [], offset
  for token in ids:
    text = _token_text(tokenizer, token)
    tokens.append(text)
    offsets.append(at)
    at += len(text)
  return {"tokens": tokens,
          "token_logprobs": [None if e is None else e.logprob for e in entries],
          "top_logprobs": [None if e is None else {_token_text(tokenizer, i): v for i, v in e.top[:top]}
                           for e in entries],
          "text_offset": offsets}
