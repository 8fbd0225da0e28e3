"""The scheduler: which requests run, which prompt tokens are prefilled and how long the next decode window is.
Plain Python over `Request`s and the `PagePool`, so it is tested without JAX; the runner (runner.py) turns its
plans into device calls and the engine (engine.py) applies their results.

Each engine step (vLLM v1's model, with PSA's on-device decode window in place of a single decode token):
  1. admission: waiting requests take a slot (at most `max_batch` admitted) and the pages of their context,
     first come first served;
  2. prefill: chunks of as many admitted prompts as the token budget allows, in one batched device call. The
     budget is `max_num_batched_tokens` per step, less one token per running decode, counted on the padded
     shape the call runs on, so a queue of short prompts is admitted together and a long prompt is cut into
     chunks that leave room for everyone else;
  3. decode: one window for the running requests of one attention kind (kinds take turns), as many steps as fit
     in `max_window_seconds` at the measured speed of that batch, so streams advance several times a second
     and a prompt that arrives mid-window waits a fraction of a second for its turn.
When the pool cannot grow a running request for the window, the most recently admitted request is preempted:
its pages are freed, and its prompt plus output so far is prefilled again later (recomputation).

`policy="serial"` keeps the simpler scheduler this one replaced, for side-by-side comparison: one chunk of one
prompt per step and full-length windows.
"""

from __future__ import annotations

import collections
import dataclasses
import statistics

from psa_jax.serving.pages import ArenaFull, PagePool
from psa_jax.serving.request import Request, Status

POLICIES = ("budget", "serial")
MIN_SPAN = 16  # prefill spans are powers of two of at least this many tokens (request.py's shape buckets)


def bucket(n: int, minimum: int = 1) -> int:
  """The power-of-two shape bucket holding n: new requests reuse compiled code."""
  return max(minimum, 1 << max(0, n - 1).bit_length())


def _floor_pow2(n: int) -> int:
  return 1 << (n.bit_length() - 1) if n >= 1 else 0


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
  """max_batch: requests admitted at once (prefilling or decoding).
  max_num_batched_tokens: prefill tokens per step, padding included, plus one per running decode.
  prefill_chunk: most tokens of one prompt per step.
  decode_window: most decode steps between host reads. max_window_seconds: a window is cut shorter when the
    batch's measured step time says it would take longer (budget policy).
  policy: "budget", or "serial" (one chunk of one prompt per step, full windows).
  """

  max_batch: int = 8
  max_num_batched_tokens: int = 2048
  prefill_chunk: int = 512
  decode_window: int = 16
  max_window_seconds: float = 0.25
  policy: str = "budget"

  def __post_init__(self):
    if self.policy not in POLICIES:
      raise ValueError(f"scheduler policy must be one of {POLICIES}, got {self.policy!r}")
    for name in ("max_batch", "prefill_chunk", "decode_window"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.max_num_batched_tokens < MIN_SPAN:
      raise ValueError(f"max_num_batched_tokens must be >= {MIN_SPAN}, got {self.max_num_batched_tokens}")
    if self.max_window_seconds <= 0:
      raise ValueError(f"max_window_seconds must be > 0, got {self.max_window_seconds}")


@dataclasses.dataclass(frozen=True)
class Chunk:
  """Tokens request.context[start : start + length] go into the arena; `last` samples the first token."""

  request: Request
  start: int
  length: int

  @property
  def last(self) -> bool:
    return self.start + self.length == len(self.request.context)


@dataclasses.dataclass
class DecodePlan:
  kind: str
  batch: list[Request]
  steps: int
  preempted: list[Request]


class Scheduler:
  def __init__(self, config: SchedulerConfig, pages: PagePool):
    self.config = config
    self.pages = pages
    self.waiting: collections.deque[Request] = collections.deque()
    self.prefilling: list[Request] = []
    self.running: list[Request] = []
    self.held: list[Request] = []
    self._admitted: list[int] = []  # ids of admitted requests, oldest first: preemption takes the newest
    self._kind_turn = 0
    self._step_seconds: dict[tuple[str, int], collections.deque[float]] = {}
    self.preemptions = 0

  # ------------------------------------------------------------------------------------------ queues

  def add(self, request: Request) -> None:
    request.state = Status.WAITING
    self.waiting.append(request)

  def requests(self) -> list[Request]:
    return [*self.waiting, *self.prefilling, *self.running, *self.held]

  def has_work(self) -> bool:
    """Anything to prefill or decode (held requests are idle)."""
    return bool(self.waiting or self.prefilling or self.running)

  def remove(self, request: Request) -> None:
    """Takes a request out of every queue and frees its pages (finished, cancelled or failed)."""
    self.pages.release(request.id)
    for queue in (self.prefilling, self.running, self.held):
      if request in queue:
        queue.remove(request)
    if request in self.waiting:
      self.waiting.remove(request)
    if request.id in self._admitted:
      self._admitted.remove(request.id)

  def start_running(self, request: Request) -> None:
    """Its prompt is in the arena and its first token sampled."""
    self.prefilling.remove(request)
    request.state = Status.RUNNING
    self.running.append(request)

  def add_prefilling(self, request: Request, prefilled: int) -> None:
    """A request whose pages already hold its context's first `prefilled` tokens (a sample sharing another's
    prompt): it prefills the rest like any admitted request."""
    request.state, request.prefilled = Status.PREFILLING, prefilled
    self.prefilling.append(request)
    self._admitted.append(request.id)

  def add_running(self, request: Request) -> None:
    """A forked request, whose pages are already in place."""
    request.state = Status.RUNNING
    self.running.append(request)
    self._admitted.append(request.id)

  def hold(self, request: Request) -> None:
    if request.state != Status.RUNNING:
      raise ValueError("only a running request can be held")
    self.running.remove(request)
    self._admitted.remove(request.id)
    request.state = Status.HELD
    self.held.append(request)

  def preempt(self, request: Request) -> None:
    """Frees its pages and queues it first: its context is prefilled again when it is readmitted."""
    self.pages.release(request.id)
    for queue in (self.prefilling, self.running):
      if request in queue:
        queue.remove(request)
    self._admitted.remove(request.id)
    request.state, request.prefilled = Status.WAITING, 0
    request.preemptions += 1
    self.preemptions += 1
    self.waiting.appendleft(request)

  # --------------------------------------------------------------------------------------- planning

  def admit(self) -> list[Request]:
    """Moves waiting requests to prefilling while a slot and the pages of their context are free. First come
    first served: when the head of the queue does not fit, later requests wait behind it."""
    admitted = []
    while self.waiting and len(self.prefilling) + len(self.running) < self.config.max_batch:
      request = self.waiting[0]
      try:
        self.pages.ensure(request.id, len(request.context) + 1)
      except ArenaFull:
        break
      self.waiting.popleft()
      request.state, request.prefilled = Status.PREFILLING, 0
      self.prefilling.append(request)
      self._admitted.append(request.id)
      admitted.append(request)
    return admitted

  def plan_prefill(self) -> list[Chunk]:
    """This step's prompt chunks, oldest admission first. Their padded shape [bucket(rows), span] (span a power
    of two >= MIN_SPAN) stays within the token budget left by the running decodes."""
    c = self.config
    if not self.prefilling:
      return []
    if c.policy == "serial":
      request = self.prefilling[0]
      return [Chunk(request, request.prefilled, min(c.prefill_chunk, len(request.context) - request.prefilled))]
    budget = max(MIN_SPAN, c.max_num_batched_tokens - len(self.running))
    chunks: list[Chunk] = []
    for request in self.prefilling:
      rows = bucket(len(chunks) + 1)
      span_cap = min(_floor_pow2(budget // rows), bucket(c.prefill_chunk, MIN_SPAN))
      if span_cap < MIN_SPAN or any(bucket(ch.length, MIN_SPAN) > span_cap for ch in chunks):
        break  # another row would push the padded shape past the budget
      length = min(len(request.context) - request.prefilled, span_cap, c.prefill_chunk)
      chunks.append(Chunk(request, request.prefilled, length))
    return chunks

  def plan_decode(self) -> DecodePlan | None:
    """The next decode window: one attention kind's running requests (kinds take turns), with pages reserved
    for every step of the window, preempting the newest admissions when the pool runs dry."""
    if not self.running:
      return None
    kinds = sorted({r.attention for r in self.running})
    kind = kinds[self._kind_turn % len(kinds)]
    self._kind_turn += 1
    batch = [r for r in self.running if r.attention == kind][: self.config.max_batch]
    steps = self._window_steps(kind, len(batch))
    preempted = []
    for request in list(batch):
      while request.state == Status.RUNNING:
        try:
          self.pages.ensure(request.id, len(request.context) - 1 + min(steps, request.remaining_tokens))
          break
        except ArenaFull:
          running = {r.id: r for r in self.running}
          newest = running[next(i for i in reversed(self._admitted) if i in running)]
          self.preempt(newest)
          preempted.append(newest)
    batch = [r for r in batch if r.state == Status.RUNNING]
    if not batch:
      return None
    return DecodePlan(kind, batch, min(steps, max(r.remaining_tokens for r in batch)), preempted)

  def _window_steps(self, kind: str, batch_size: int) -> int:
    c = self.config
    if c.policy == "serial":
      return c.decode_window
    seen = self._step_seconds.get((kind, bucket(batch_size)))
    if not seen:
      return c.decode_window  # nothing measured yet (the first window also compiles)
    return max(1, min(c.decode_window, int(c.max_window_seconds / max(statistics.median(seen), 1e-6))))

  def observe_window(self, kind: str, batch_size: int, steps: int, seconds: float) -> None:
    """The runner's measured wall time of a window that compiled nothing."""
    if steps > 0:
      times = self._step_seconds.setdefault((kind, bucket(batch_size)), collections.deque(maxlen=8))
      times.append(seconds / steps)
