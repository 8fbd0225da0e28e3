"""The retrieval study: whole answers to needle-in-a-haystack questions asked in chat form, paired against dense.

Each item is one user message in the model's chat template: a haystack (the first tokens of a document) with
needles spliced in at sentence ends, then a question; the model answers greedily. Kinds, as in RULER:
  single      "The locker number of NAME is NNNNNN."; asked for NAME's number.
  multikey    four such sentences for four names; asked for one of them (the others distract).
  multivalue  four numbers for one name; asked for all four.
  variables   a chain "VAR A = NNNNNN." "VAR B = VAR A." ... of four variables; asked which variables hold NNNNNN.
An answer is right when every expected number or name appears as a whole word in it: a number with its first
digits right and the rest lost is wrong, which is what a user sees.

Depths: item i of n in a cell puts its needle (the first needle, for the kinds with several) at depth i / (n - 1)
of the haystack, 0% to 100%; the other needles of an item go to random depths (after it, for variables).

The prompt is prefilled densely, as in serving: what differs between methods is the decode attention, so the
first answer token comes from the dense prefill and every later one from the method under test. Each item is
prefilled once and every method decodes from that cache. Statistics per (context, kind, method): right answers
of n with a Wilson 95% interval; against dense item by item, the items only dense answers (b) and only the method
answers (c), with McNemar's exact two-sided p-value (a binomial test of b against b + c); and the share of KV
blocks the method's decode steps read. Every item's answers are written out beside the table.

Diagnosis: each item that the first PSA method answers wrong and dense right (up to `diagnose` of them) is traced
(needle_trace.py): in which layers and heads dense reads the needle, whether PSA read it there, and if not whether
its order or its stop lost it. A table per item, and a heat map of the lost share per layer and KV head.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import string
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from psa_jax.backend import AttentionBackend
from psa_jax.bench import common, quality, tasks
from psa_jax.config import PSAConfig
from psa_jax.models import checkpoint
from psa_jax.pallas_kernels.storage import storage_dtype

KINDS = ("single", "multikey", "multivalue", "variables")
_SPARE_TOKENS = 256  # read past a context's length, to start its haystack at a sentence end
# Room for the whole answer with the words a small chat model puts around it (its digits are one token each).
ANSWER_TOKENS = {"single": 24, "multikey": 24, "multivalue": 64, "variables": 48}
_FIRST = ("Alice", "Bruno", "Chen", "Dmitri", "Elena", "Farah", "Gustav", "Hana", "Ivan", "Jonas", "Keiko", "Liam",
          "Mara", "Nikolai", "Olga", "Pedro", "Quinn", "Rosa", "Sven", "Tariq", "Ursula", "Viktor", "Wen", "Yara")
_LAST = ("Abbott", "Brandt", "Castillo", "Dubois", "Eriksen", "Fischer", "Garcia", "Haddad", "Ito", "Jensen",
         "Kowalski", "Lindqvist", "Moreau", "Nakamura", "Okafor", "Petrov", "Rossi", "Schmidt", "Tanaka", "Weber")


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  backend: AttentionBackend
  tau: float


def default_methods(taus: tuple[float, ...] = (PSAConfig.tau, 0.95), ks: tuple[int, ...] = (32, 64),
                    dense_heads: tuple[tuple[int, int], ...] = ()) -> tuple[Method, ...]:
  """Dense first (every other method is paired against it), then Quest top-k at each k and PSA (its defaults
  otherwise, reading `dense_heads` densely) at each tau."""
  return ((Method("dense", AttentionBackend.named("dense"), 1.0),)
          + tuple(Method(f"topk@{k}", AttentionBackend.named("topk", k_blocks=k), 1.0) for k in ks)
          + tuple(Method(f"psa@{t:g}", AttentionBackend.named("psa", dense_heads=dense_heads), t) for t in taus))


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
  model: str | None = None
  contexts: tuple[int, ...] = (2048, 4096, 8192)
  kinds: tuple[str, ...] = KINDS
  items: int = 48  # per (context, kind)
  methods: tuple[Method, ...] = default_methods()
  documents: tuple[str, ...] = ()  # text files; default: the quality study's standard-library texts
  answer_tokens: int | None = None  # greedy tokens per answer; None: ANSWER_TOKENS of the kind
  block_size: int = 16
  kv_dtype: str = "bfloat16"
  seed: int = 0
  diagnose: int = 8  # items PSA misses and dense answers, traced (each costs a prefill with q/k/v captured)

  def __post_init__(self):
    unknown = set(self.kinds) - set(KINDS)
    if unknown:
      raise ValueError(f"unknown retrieval kinds {sorted(unknown)}; known: {KINDS}")
    if self.items < 1:
      raise ValueError(f"items must be >= 1, got {self.items}")
    if not self.methods or self.methods[0].name != "dense":
      raise ValueError("the first method must be dense: the others are paired against it")


# ------------------------------------------------------------------------------------------------------ items

@dataclasses.dataclass(frozen=True)
class Item:
  context: int
  kind: str
  index: int
  depth: float  # asked for: where the (first) needle goes in the haystack, 0..1
  placed: float  # where it went: the share of the haystack before it (it waits for a sentence end)
  document: str
  ids: list[int]  # the whole chat prompt, `context` tokens
  needle_tokens: tuple[int, int]  # [start, end) of the (first) needle in `ids`
  answers: tuple[str, ...]  # every one must appear in the answer


def _name(rng: random.Random) -> str:
  return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"


def _number(rng: random.Random) -> str:
  return str(rng.randrange(100_000, 1_000_000))


def _needles(kind: str, rng: random.Random) -> tuple[list[str], str, tuple[str, ...]]:
  """(needle sentences, the first being the one placed at the item's depth; the question; the answers)."""
  if kind == "single":
    name, number = _name(rng), _number(rng)
    return ([f"The locker number of {name} is {number}."],
            f"What is the locker number of {name}? Answer with the number only.", (number,))
  if kind == "multikey":  # four people with no first or last name in common
    names = [f"{a} {b}" for a, b in zip(rng.sample(_FIRST, 4), rng.sample(_LAST, 4))]
    numbers = [_number(rng) for _ in names]
    return ([f"The locker number of {n} is {v}." for n, v in zip(names, numbers)],
            f"What is the locker number of {names[0]}? Answer with the number only.", (numbers[0],))
  if kind == "multivalue":
    name, numbers = _name(rng), [_number(rng) for _ in range(4)]
    return ([f"One of the locker numbers of {name} is {v}." for v in numbers],
            f"What are all the locker numbers of {name}? Answer with the four numbers only.", tuple(numbers))
  if kind == "variables":
    names = rng.sample(["".join(rng.choices(string.ascii_uppercase, k=5)) for _ in range(8)], 4)
    number = _number(rng)
    chain = [f"VAR {names[0]} = {number}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    return (chain, f"Which variables are assigned the value {number}, directly or through other variables? "
            "Answer with their names only.", tuple(names))
  raise ValueError(f"unknown retrieval kind {kind!r}; known: {KINDS}")


def chat_frame(tokenizer) -> tuple[list[int], list[int]]:
  """The ids the chat template puts before and after one user message's text, as the server encodes chats
  (Tokenizer.encode_chat: the template's own text tokenized, the message's text spliced in as plain text)."""
  mark = "\x00psa-retrieval\x00"
  rendered = tokenizer.apply_chat_template([{"role": "user", "content": mark}], add_generation_prompt=True)
  before, after = rendered.split(mark)
  bos = [tokenizer.bos_token_id] if tokenizer.add_bos and tokenizer.bos_token_id is not None else []
  enc = lambda text: tokenizer.backend.encode(text, add_special_tokens=False).ids if text else []
  return bos + enc(before), enc(after)


def _sentence_ends(tokenizer, ids: list[int]) -> list[int]:
  """Positions just after a token that ends a sentence or a line: where a needle can go."""
  return [i + 1 for i, t in enumerate(ids) if tokenizer.decode([t]).rstrip(" ").endswith((".", "\n", "!", "?"))]


def make_items(tokenizer, documents: list[tuple[str, list[int]]], context: int, kind: str, n: int, seed: int
               ) -> list[Item]:
  """`n` items of `kind` with exactly `context` tokens, their needles at depths 0 to 1 (item i at i / (n - 1)),
  the haystack of item i from documents[i % len(documents)] (label, ids), each with a few hundred tokens more
  than `context`."""
  before, after = chat_frame(tokenizer)
  enc = lambda text: tokenizer.encode(text, add_bos=False)
  intro = enc("Below is a text. Some sentences in it were added to it; read it and answer the question after it."
              "\n\n")
  rng = random.Random(f"{seed}-{context}-{kind}")
  hays, ends = {}, {}
  for label, ids in documents:  # from the first sentence end on: a document's text may begin mid-sentence
    found = _sentence_ends(tokenizer, ids[:context])
    start = found[0] if found and found[0] < len(ids) - context else 0
    hays[label] = ids[start:start + context]
    ends[label] = [e - start for e in found if e > start]
  items = []
  for i in range(n):
    label = documents[i % len(documents)][0]
    hay = hays[label]
    sentences, question, answers = _needles(kind, rng)
    needles = [enc(" " + s + " ") for s in sentences]
    tail = enc("\n\n" + question)
    room = context - len(before) - len(intro) - len(tail) - len(after) - sum(map(len, needles))
    if room < 16:
      raise ValueError(f"context {context} is too short for a {kind} item")
    depth = i / (n - 1) if n > 1 else 0.5
    spots = [e for e in ends[label] if e <= room] + [room]
    place = lambda d: min(spots, key=lambda e: abs(e - d * room))
    first = place(depth)
    if kind == "variables":  # a chain is read forwards: the later links after the first
      rest = sorted(place(rng.uniform(depth, 1.0)) for _ in needles[1:])
    else:
      rest = [place(rng.random()) for _ in needles[1:]]
    order = sorted(zip([first] + rest, range(len(needles))))  # (cut, needle), the first needle before its peers
    ids, last, span = before + intro, 0, None
    for cut, j in order:
      ids += hay[last:cut]
      if j == 0:
        span = (len(ids), len(ids) + len(needles[0]))
      ids += needles[j]
      last = cut
    ids += hay[last:room] + tail + after
    assert len(ids) == context, (len(ids), context)
    items.append(Item(context, kind, i, depth, first / room, label, ids, span, answers))
  return items


def is_right(text: str, answers: tuple[str, ...]) -> bool:
  """Every answer appears as a whole word: 123456 is not in 1234567, and ABCDE is not in ABCDEF."""
  return all(re.search(rf"(?<![0-9A-Za-z]){re.escape(a)}(?![0-9A-Za-z])", text) for a in answers)


# ------------------------------------------------------------------------------------------------- statistics

def mcnemar_p(b: int, c: int) -> float:
  """Exact two-sided McNemar p-value for b items right only under one method and c only under the other."""
  n = b + c
  if n == 0:
    return 1.0
  tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
  return min(1.0, 2 * tail)


def summarize(records: list[dict], methods: tuple[Method, ...]) -> list[dict]:
  """One row per (context, kind, method), and per (context, method) over every kind (kind "all")."""
  rows = []
  by_item = {}
  for r in records:
    by_item.setdefault((r["context"], r["kind"], r["index"]), {})[r["method"]] = r
  cells = sorted({(c, k) for c, k, _ in by_item}, key=lambda ck: (ck[0], KINDS.index(ck[1])))
  contexts = sorted({c for c, _ in cells})
  groups = [(c, k, [i for i in by_item if i[:2] == (c, k)]) for c, k in cells]
  groups += [(c, "all", [i for i in by_item if i[0] == c]) for c in contexts]
  for context, kind, keys in groups:
    for m in methods:
      right = [by_item[key][m.name]["right"] for key in keys]
      dense = [by_item[key]["dense"]["right"] for key in keys]
      b = sum(d and not x for d, x in zip(dense, right))
      c = sum(x and not d for d, x in zip(dense, right))
      low, high = quality.wilson(sum(right), len(right))
      blocks = sum(by_item[key][m.name]["blocks"] for key in keys)
      dense_blocks = sum(by_item[key][m.name]["dense_blocks"] for key in keys)
      rows.append(dict(context=context, kind=kind, method=m.name, n=len(right), right=sum(right),
                       accuracy=sum(right) / len(right), ci_low=low, ci_high=high, only_dense=b, only_method=c,
                       mcnemar_p=mcnemar_p(b, c), kv_share_read=blocks / max(dense_blocks, 1)))
  return rows


# ------------------------------------------------------------------------------------------------------ study

def run(config: RetrievalConfig, out_dir) -> list[dict]:
  common.progress(f"loading {config.model or checkpoint.DEFAULT_MODEL}")
  lm = checkpoint.load(config.model, dtype=jnp.float32)
  tok = lm.tokenizer
  graphdef, state = nnx.split(lm.model)
  kv_storage = storage_dtype(config.kv_dtype, model_dtype=lm.model.dtype)
  stops = set(tok.eos_token_ids)
  records = []
  items = []
  for context in config.contexts:
    docs = quality.load_documents(config.documents, tok, context + _SPARE_TOKENS, add_bos=False)
    for kind in config.kinds:
      items += make_items(tok, docs, context, kind, config.items, config.seed)
  began = time.perf_counter()
  for n_done, item in enumerate(items):
    elapsed = time.perf_counter() - began
    eta = f", {elapsed / n_done * (len(items) - n_done) / 60:.0f} min left" if n_done else ""
    common.progress(f"[{n_done + 1}/{len(items)}] {item.kind} at {item.context} tokens, depth {item.depth:.2f}{eta}")
    steps = config.answer_tokens or ANSWER_TOKENS[item.kind]
    padded = tasks.bucket(len(item.ids))
    width = tasks.table_width(padded + steps + 1, config.block_size)
    tokens = jnp.asarray(item.ids + [0] * (padded - len(item.ids)), jnp.int32)
    kv, tables, first, _ = tasks.prefill(graphdef, state, tokens, jnp.int32(len(item.ids)), width=width,
                                          block_size=config.block_size, kv_storage=kv_storage)
    forced = jnp.full((steps,), -1, jnp.int32)
    for m in config.methods:
      greedy, _, used, dense = jax.device_get(tasks.decode_greedy(
          graphdef, state, kv, tables, first, jnp.int32(len(item.ids)), forced, jnp.float32(m.tau),
          attention=m.backend, steps=steps))
      answer = [int(first)] + [int(t) for t in greedy]
      cut = next((i for i, t in enumerate(answer) if t in stops), len(answer))
      text = tok.decode(answer[:cut])
      records.append(dict(context=item.context, kind=item.kind, index=item.index, depth=item.depth,
                          placed=item.placed, document=item.document, needle_tokens=list(item.needle_tokens), method=m.name,
                          answers=list(item.answers), text=text, right=is_right(text, item.answers),
                          answer_ids=answer[:cut],
                          # the decode steps whose tokens were kept: step j read answer[j] and chose answer[j + 1]
                          blocks=float(used[:max(cut - 1, 0)].sum()),
                          dense_blocks=float(dense[:max(cut - 1, 0)].sum())))
    # Every answer so far, so that a long run cut short still leaves its items (retrieval.summarize reads them).
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "retrieval_items.json").write_text(json.dumps(records, indent=0))
  rows = summarize(records, config.methods)
  _report(rows, records, config, out_dir)
  _diagnose(lm, items, records, config, out_dir)
  return rows


def _diagnose(lm, items: list[Item], records: list[dict], config: RetrievalConfig, out_dir) -> list[dict]:
  """Traces the items the first PSA method misses and dense answers (needle_trace.py)."""
  from psa_jax.bench import needle_trace

  psa = next((m for m in config.methods if m.backend.kind == "psa"), None)
  if psa is None or not config.diagnose:
    return []
  by_key = {(r["context"], r["kind"], r["index"], r["method"]): r for r in records}
  missed = [it for it in items
            if by_key[(it.context, it.kind, it.index, "dense")]["right"]
            and not by_key[(it.context, it.kind, it.index, psa.name)]["right"]][:config.diagnose]
  out, lost = [], None
  for n, item in enumerate(missed):
    common.progress(f"diagnosing {n + 1}/{len(missed)}: {item.kind} at {item.context} tokens, depth {item.depth:.2f}")
    answer = by_key[(item.context, item.kind, item.index, "dense")]["answer_ids"]
    if len(answer) < 2:
      continue
    arrays = needle_trace.trace(lm, item.ids, answer, item.needle_tokens, psa.backend.config, psa.tau,
                                config.block_size, psa.backend.dense_heads)
    hot = arrays["dense_share"] >= needle_trace.HEAVY
    item_lost = (hot & ~arrays["read"]).sum(axis=0) / np.maximum(hot.sum(axis=0), 1)  # [layers, kv_heads]
    lost = item_lost if lost is None else lost + item_lost
    out.append(dict(context=item.context, kind=item.kind, index=item.index, depth=item.depth,
                    method=psa.name, psa_text=by_key[(item.context, item.kind, item.index, psa.name)]["text"],
                    dense_text=by_key[(item.context, item.kind, item.index, "dense")]["text"],
                    **needle_trace.attribute(arrays),
                    dense_share=arrays["dense_share"].tolist(), rank=arrays["rank"].tolist(),
                    exact_rank=arrays["exact_rank"].tolist(), used=arrays["used"].tolist()))
  if not out:
    return out
  columns = ["context", "kind", "depth", "heavy", "read", "lost_to_order", "lost_to_stop", "lost_rank",
             "lost_exact_rank", "lost_used", "heavy_heads"]
  print(f"\n{psa.name} against dense where only dense answers: (step, layer, head) cells with dense mass >= "
        f"{needle_trace.HEAVY:g} on the needle")
  print(common.table(out, columns))
  (out_dir / "retrieval_diagnosis.json").write_text(json.dumps(out))
  _lost_heatmap(out_dir / "retrieval_diagnosis.png", lost / len(out), psa.name)
  return out


def _lost_heatmap(path, lost, method: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(4 + 0.5 * lost.shape[1], 0.18 * lost.shape[0] + 1.5))
  im = ax.imshow(lost, aspect="auto", cmap="magma", vmin=0, vmax=1)
  ax.set_xticks(range(lost.shape[1]))
  ax.set_xlabel("KV head")
  ax.set_ylabel("layer")
  ax.set_title(f"{method}: share of needle-heavy steps whose needle\nit did not read (items only dense answered)",
               fontsize=9)
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _report(rows, records, config: RetrievalConfig, out_dir) -> None:
  columns = ["context", "kind", "method", "right", "n", "accuracy", "ci_low", "ci_high", "only_dense",
             "only_method", "mcnemar_p", "kv_share_read"]
  print("\n" + common.table(rows, columns))
  meta = {"config": {**dataclasses.asdict(config), "methods": [m.name for m in config.methods]}}
  common.save(out_dir, "retrieval", rows, meta)
  (out_dir / "retrieval_items.json").write_text(json.dumps(records, indent=0))
  bins = np.linspace(0.0, 1.0, 6)
  for context in config.contexts:
    series = {}
    for m in config.methods:
      mine = [r for r in records if r["context"] == context and r["method"] == m.name]
      xs, ys = [], []
      for lo, hi in zip(bins[:-1], bins[1:]):
        inside = [r["right"] for r in mine if lo <= r["depth"] < hi or (hi == 1.0 and r["depth"] == 1.0)]
        if inside:
          xs.append(float((lo + hi) / 2))
          ys.append(float(np.mean(inside)))
      series[m.name] = (xs, ys)
    common.plot(out_dir / f"retrieval_{context}.png", f"Whole-answer retrieval at {context} tokens (all kinds)",
                "needle depth", "share of items answered right", series)
