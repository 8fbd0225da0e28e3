"""Constrained decoding: output that must match a regular expression or a JSON schema.

A grammar becomes a token automaton: states, and for each state the tokens allowed next and the state each
leads to (outlines-core compiles the regex over the tokenizer's byte vocabulary; a JSON schema is first turned
into a regex by outlines-core as well). The automaton lives on the device as arrays, so a decode window masks
and advances it inside its `lax.while_loop` with no host round trip per token:

  mask      [S, W] uint32  bit t % 32 of word t // 32 of row s: token t is allowed in state s
  default   [S] int32      where most allowed tokens of state s lead (inside a JSON string: back to s itself)
  row_start [S] int32      the allowed tokens that lead elsewhere are tokens[row_start[s] : + row_len[s]],
  row_len   [S] int32      sorted, so their next state is found by binary search
  tokens    [N] int32
  next      [N] int32      global state ids
  state     [B] int32      each sequence's current state; -1: the sequence is not constrained

Storing only the exceptions to each state's default keeps the table small: inside a string almost every token
is allowed and loops back, so a generic JSON automaton has millions of transitions but few exceptions.

Several requests may use different grammars at once: `GrammarTable` concatenates the automata of the
requests in flight into one table (state ids offset per automaton) whose sizes are rounded up to powers of
two, so new grammars rarely mean new shapes to compile. The end-of-sequence token is allowed exactly in the
automaton's accepting states, so a constrained request ends when its output is complete.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
import weakref
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from psa_jax.serving.scheduler import bucket

MAX_GRAMMAR_STATES = 1 << 14  # per automaton; beyond this a schema is refused as too complex
MAX_TABLE_STATES = 1 << 15  # the device table keeps grammars no longer in use until it would hold more
_MIN_STATES = 2048  # table size buckets: the generic JSON automaton and a few schemas fit the smallest
_MIN_TRANSITIONS = 1 << 15
WHITESPACE = r"[ ]?"  # between JSON tokens: at most one space, so a small model cannot wander off in blanks


class GrammarError(ValueError):
  """A grammar that cannot be compiled (a malformed schema, an unsupported feature, too many states)."""


class Constraint(NamedTuple):
  """The device form of the automata in use and each sequence's state (see the module docstring)."""

  mask: jax.Array
  default: jax.Array
  row_start: jax.Array
  row_len: jax.Array
  tokens: jax.Array
  next: jax.Array
  state: jax.Array


# ---------------------------------------------------------------------------------------------- on device


def allowed(constraint: Constraint, vocab: int) -> jax.Array:
  """[B, vocab] bool: the tokens each sequence may emit next (all of them where it is unconstrained)."""
  words = constraint.mask[jnp.maximum(constraint.state, 0)]  # [B, W]
  bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1  # [B, W, 32]
  ok = bits.reshape(words.shape[0], -1)[:, :vocab].astype(bool)
  return ok | (constraint.state < 0)[:, None]


def constrain(logits: jax.Array, constraint: Constraint | None) -> jax.Array:
  """logits [B, V] with the tokens the grammar forbids at -inf."""
  if constraint is None:
    return logits
  return jnp.where(allowed(constraint, logits.shape[-1]), logits, -jnp.inf)


def advance(constraint: Constraint | None, tokens: jax.Array, active: jax.Array) -> Constraint | None:
  """The constraint after the active sequences emit tokens [B]: each state moves along its token's transition
  (binary search among the state's exceptions, else its default). A token the state does not allow (possible
  only where the grammar had nothing to allow) leaves the state where it was."""
  if constraint is None:
    return None
  state = jnp.maximum(constraint.state, 0)
  lo = constraint.row_start[state]
  end = lo + constraint.row_len[state]
  hi = end
  last = constraint.tokens.shape[0] - 1
  for _ in range(max(1, int(np.ceil(np.log2(constraint.tokens.shape[0] + 1))))):
    mid = (lo + hi) // 2
    right = constraint.tokens[jnp.minimum(mid, last)] < tokens
    open_ = lo < hi
    lo = jnp.where(open_ & right, mid + 1, lo)
    hi = jnp.where(open_ & ~right, mid, hi)
  at = jnp.minimum(lo, last)
  found = (lo < end) & (constraint.tokens[at] == tokens)
  allowed_now = (constraint.mask[state, tokens // 32] >> (tokens % 32).astype(jnp.uint32)) & 1
  moved = jnp.where(found, constraint.next[at], constraint.default[state])
  moved = jnp.where(allowed_now.astype(bool), moved, constraint.state)
  return constraint._replace(state=jnp.where(active & (constraint.state >= 0), moved, constraint.state))


# ------------------------------------------------------------------------------------------------ on host


@dataclasses.dataclass(frozen=True, eq=False)
class TokenAutomaton:
  """One grammar over one vocabulary. States are numbered from 0, the initial state."""

  mask: np.ndarray  # [S, W] uint32
  default: np.ndarray  # [S] int32, local state ids
  row_start: np.ndarray  # [S] int32
  row_len: np.ndarray  # [S] int32
  tokens: np.ndarray  # [N] int32, sorted within each state's row
  next: np.ndarray  # [N] int32, local state ids
  vocab: int

  @property
  def num_states(self) -> int:
    return len(self.row_start)

  def allowed(self, state: int) -> np.ndarray:
    """The token ids allowed in `state`, ascending."""
    bits = np.unpackbits(self.mask[state].view(np.uint8), bitorder="little")[: self.vocab]
    return np.flatnonzero(bits)

  def step(self, state: int, token: int) -> int | None:
    """The state after `token`, or None if the grammar forbids it (the host-side twin of `advance`)."""
    if not (self.mask[state, token // 32] >> np.uint32(token % 32)) & 1:
      return None
    row = slice(self.row_start[state], self.row_start[state] + self.row_len[state])
    at = np.searchsorted(self.tokens[row], token)
    if at < self.row_len[state] and self.tokens[row][at] == token:
      return int(self.next[row][at])
    return int(self.default[state])


def regex_for(kind: str, value) -> str:
  """The regular expression of a request's constraint: kind "json_schema" (a schema dict), "json_object" (any
  JSON object), "regex" (a pattern) or "choice" (a list of strings, one of which the output is)."""
  from outlines_core import json_schema as outlines_json

  try:
    if kind == "json_object":
      return outlines_json.build_regex_from_schema(json.dumps({"type": "object"}), WHITESPACE)
    if kind == "json_schema":
      return outlines_json.build_regex_from_schema(json.dumps(value), WHITESPACE)
  except Exception as e:  # the Rust side raises plain Exceptions with a readable message
    raise GrammarError(f"cannot use this JSON schema: {e}") from e
  if kind == "regex":
    return value
  if kind == "choice":
    import re
    return "(" + "|".join(re.escape(c) for c in value) + ")"
  raise GrammarError(f"unknown constraint kind {kind!r}")


class _Vocabulary:
  """outlines-core's view of a tokenizer, built once per tokenizer."""

  def __init__(self, tokenizer, vocab: int):
    from outlines_core import Vocabulary

    if not tokenizer.eos_token_ids:
      raise GrammarError("constrained output needs a model with an end-of-sequence token")
    self.eos = tokenizer.eos_token_ids[0]
    pieces: dict[bytes, list[int]] = {}
    for token, piece in enumerate(tokenizer.token_bytes()[:vocab]):
      if piece and token not in tokenizer.eos_token_ids:
        pieces.setdefault(piece, []).append(token)
    self.outlines = Vocabulary(self.eos, pieces)
    self.vocab = vocab


_vocabularies: "weakref.WeakKeyDictionary[object, _Vocabulary]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def compile_regex(tokenizer, vocab: int, regex: str) -> TokenAutomaton:
  """The token automaton of `regex` over the tokenizer's vocabulary (the model's `vocab` logits). Cached:
  repeated schemas cost nothing after the first. Raises GrammarError."""
  with _lock:
    vocabulary = _vocabularies.get(tokenizer)
    if vocabulary is None or vocabulary.vocab != vocab:
      vocabulary = _vocabularies[tokenizer] = _Vocabulary(tokenizer, vocab)
  return _compile(vocabulary, regex)


@functools.lru_cache(maxsize=64)
def _compile(vocabulary: _Vocabulary, regex: str) -> TokenAutomaton:
  from outlines_core import Index

  try:
    index = Index(regex, vocabulary.outlines)
  except Exception as e:
    raise GrammarError(f"cannot compile the constraint: {e}") from e
  transitions = index.get_transitions()  # {state: {token: state}}
  if len(transitions) > MAX_GRAMMAR_STATES:
    raise GrammarError(f"the constraint needs {len(transitions)} automaton states; at most {MAX_GRAMMAR_STATES}")
  initial = index.get_initial_state()
  order = [initial] + sorted(s for s in transitions if s != initial)
  number = {s: i for i, s in enumerate(order)}
  for row in transitions.values():  # states reached but with no way on (they cannot end either) stay dead
    for target in row.values():
      if target not in number:
        number[target] = len(order)
        order.append(target)
  mask = np.zeros((len(order), -(-vocabulary.vocab // 32)), np.uint32)
  default = np.arange(len(order), dtype=np.int32)  # a state with no way on stays where it is
  rows_tokens, rows_next = [], []
  for i, s in enumerate(order):
    row = transitions.get(s, {})
    ids = np.fromiter(row.keys(), np.int32, len(row))
    targets = np.fromiter((number[t] for t in row.values()), np.int32, len(row))
    np.bitwise_or.at(mask[i], ids // 32, np.uint32(1) << (ids % 32).astype(np.uint32))
    if len(ids):
      values, counts = np.unique(targets, return_counts=True)
      default[i] = values[np.argmax(counts)]
    keep = targets != default[i]
    sort = np.argsort(ids[keep])
    rows_tokens.append(ids[keep][sort])
    rows_next.append(targets[keep][sort])
  lengths = np.array([len(r) for r in rows_tokens], np.int32)
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int32)
  tokens = np.concatenate(rows_tokens) if rows_tokens else np.zeros(0, np.int32)
  nexts = np.concatenate(rows_next) if rows_next else np.zeros(0, np.int32)
  return TokenAutomaton(mask, default, starts, lengths, tokens.astype(np.int32), nexts.astype(np.int32),
                        vocabulary.vocab)


class GrammarTable:
  """The device table of the automata that requests in flight use, rebuilt when that set changes."""

  def __init__(self, vocab: int):
    self.vocab = vocab
    self._automata: tuple[TokenAutomaton, ...] = ()
    self._offsets: dict[int, int] = {}
    self._arrays: tuple | None = None

  def constraint(self, automata: Sequence[TokenAutomaton | None], states: Sequence[int], rows: int
                 ) -> Constraint | None:
    """The Constraint for a batch of `rows` sequences, the i-th under automata[i] (None: unconstrained) in its
    local state states[i]; None when no sequence is constrained. `automata` must hold every automaton still in
    use (the table keeps only those)."""
    if all(a is None for a in automata):
      return None
    wanted = tuple(dict.fromkeys(a for a in automata if a is not None))
    missing = tuple(a for a in wanted if id(a) not in self._offsets)
    if missing:
      # Keep the automata already on the device (other batches in flight use them) unless the table would
      # outgrow its cap; then keep only what this batch needs.
      kept = self._automata + missing
      if sum(a.num_states for a in kept) > MAX_TABLE_STATES:
        kept = wanted
      self._build(kept)
    state = np.full(rows, -1, np.int32)
    for i, (a, s) in enumerate(zip(automata, states)):
      if a is not None:
        state[i] = self._offsets[id(a)] + s
    return Constraint(*self._arrays, jnp.asarray(state))

  def offset(self, automaton: TokenAutomaton) -> int:
    """Where `automaton`'s states start in the table the last call used."""
    return self._offsets[id(automaton)]

  def _build(self, automata: tuple[TokenAutomaton, ...]) -> None:
    total_states = sum(a.num_states for a in automata)
    total = sum(len(a.tokens) for a in automata)
    states, transitions = bucket(total_states, _MIN_STATES), bucket(total, _MIN_TRANSITIONS)
    words = -(-self.vocab // 32)
    mask = np.zeros((states, words), np.uint32)
    default = np.zeros(states, np.int32)
    row_start = np.zeros(states, np.int32)
    row_len = np.zeros(states, np.int32)
    tokens = np.full(transitions, np.iinfo(np.int32).max, np.int32)  # padding sorts last and matches nothing
    nexts = np.zeros(transitions, np.int32)
    offsets = {}
    s = n = 0
    for a in automata:
      offsets[id(a)] = s
      mask[s : s + a.num_states, : a.mask.shape[1]] = a.mask
      default[s : s + a.num_states] = a.default + s
      row_start[s : s + a.num_states] = a.row_start + n
      row_len[s : s + a.num_states] = a.row_len
      tokens[n : n + len(a.tokens)] = a.tokens
      nexts[n : n + len(a.tokens)] = a.next + s
      s += a.num_states
      n += len(a.tokens)
    self._automata, self._offsets = automata, offsets
    self._arrays = tuple(jnp.asarray(x) for x in (mask, default, row_start, row_len, tokens, nexts))
