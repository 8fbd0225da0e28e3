"""A request's settings and its life in the engine. Plain Python: the scheduler works on these without JAX."""

from __future__ import annotations

import dataclasses
import enum
import threading
import time
from typing import Callable


MAX_LOGPROBS = 20  # alternatives reported per token (OpenAI's limit)


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
  """A token's log-probability under the model and the likeliest alternatives: ((token id, logprob), ...)."""

  logprob: float
  top: tuple[tuple[int, float], ...]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Per-request generation settings. temperature 0 is greedy.

  stop_token_ids: None stops at the model's end-of-sequence tokens; ignore_eos: never stop before max_tokens
  (benchmarks use it so every request produces the same number of tokens); min_tokens: no stop token before
  this many tokens.
  min_p, presence_penalty, frequency_penalty, repetition_penalty: vLLM's meanings (0, 0, 0, 1 are off).
  logprobs: None, or report each output token's log-probability and its `logprobs` likeliest alternatives
  (at most MAX_LOGPROBS = 20); prompt_logprobs: the same for the prompt's tokens.
  grammar: a token automaton the output must follow (JSON schema, regex, choice); its accepting states end the
  request with the end-of-sequence token.
  """

  max_tokens: int = 64
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int = 0
  stop_token_ids: tuple[int, ...] | None = None
  ignore_eos: bool = False
  min_tokens: int = 0
  min_p: float = 0.0
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  repetition_penalty: float = 1.0
  logprobs: int | None = None
  prompt_logprobs: int | None = None
  grammar: object | None = None  # a grammar.TokenAutomaton (psa_jax/serving/grammar.py); None: free text

  def __post_init__(self):
    if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
      raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
    if not 0.0 <= self.temperature <= 2.0:
      raise ValueError(f"temperature must be in [0, 2], got {self.temperature!r}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"top_k must be a non-negative integer, got {self.top_k!r}")
    if not isinstance(self.seed, int) or not 0 <= self.seed < 2**31:
      raise ValueError(f"seed must be an integer in [0, 2**31), got {self.seed!r}")
    if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
      raise ValueError(f"min_tokens must be an integer in [0, max_tokens], got {self.min_tokens!r}")
    if not 0.0 <= self.min_p <= 1.0:
      raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
    for name in ("presence_penalty", "frequency_penalty"):
      if not -2.0 <= getattr(self, name) <= 2.0:
        raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
    if not 0.0 < self.repetition_penalty <= 2.0:
      raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty!r}")
    for name in ("logprobs", "prompt_logprobs"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS):
        raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")

  @property
  def penalized(self) -> bool:
    return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


class Status(str, enum.Enum):
  """Where a request is. A str, so `request.state == "running"` reads as it says."""

  WAITING = "waiting"  # queued, or preempted and queued again; holds no pages
  PREFILLING = "prefilling"  # admitted: holds the pages of its context, which is being written chunk by chunk
  RUNNING = "running"  # decoding
  HELD = "held"  # parked with its KV kept, so it can be forked
  FINISHED = "finished"

  def __str__(self) -> str:
    return self.value


# The OpenAI finish reasons a request ends with, plus the engine's own two.
FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclasses.dataclass(eq=False)
class Request:
  """One generation. `listener(request, new_tokens, finished)` is called from the engine's thread."""

  id: int
  prompt: list[int]
  params: SamplingParams
  attention: str
  tau: float
  stop_ids: tuple[int, ...]
  listener: Callable[["Request", list[int], bool], None] | None = None
  output: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)  # per output token, when asked for
  prompt_logprobs: list[TokenLogprob | None] = dataclasses.field(default_factory=list)  # per prompt token
  state: Status = Status.WAITING
  finish_reason: str | None = None  # one of FINISH_REASONS
  error: str | None = None
  prefilled: int = 0  # tokens of prompt + output already in the arena during a prefill
  grammar_state: int = 0  # where the output so far left params.grammar
  preemptions: int = 0
  arrival: float = dataclasses.field(default_factory=time.monotonic)
  admitted_at: float | None = None  # first admission: the end of its queue time
  first_token_at: float | None = None
  finished_at: float | None = None
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  siblings: list["Request"] = dataclasses.field(default_factory=list)  # samples started from its prefill

  @property
  def context(self) -> list[int]:
    """What has to be in the arena before the next token is sampled."""
    return self.prompt + self.output

  @property
  def remaining_tokens(self) -> int:
    return self.params.max_tokens - len(self.output)
